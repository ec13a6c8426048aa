//! HTML as XML, and XPath over it: what a scraper config's `xpath` fields and follow rules
//! and a Web-Harvest config's `html-to-xml` and `xpath` processors evaluate with.

pub(crate) mod html;
pub(crate) mod xpath;
