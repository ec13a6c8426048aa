//! Benchmarks behind `harvest bench` (DESIGN §8): one JSON object of results each.

pub mod crawl;
