//! The processors harvest runs: each one's attributes (Web-Harvest's `validAttributes`, plus
//! `id` everywhere), required attributes, what it may contain and where it may stand; and the
//! Web-Harvest processors harvest refuses, with why.

use super::parse::Kind;

/// Which children an element takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Children {
    /// Any processors and text.
    Any,
    /// None (whitespace only).
    None,
    /// Exactly these structural elements (required ones first), nothing else.
    Only(&'static [&'static str], &'static [&'static str]),
    /// `case`: one or more `if`, then at most one `else`.
    Case,
}

pub(crate) struct Spec {
    pub(crate) kind: Kind,
    pub(crate) attrs: &'static [&'static str],
    pub(crate) required: &'static [&'static str],
    pub(crate) children: Children,
    /// Allowed only directly inside these elements.
    pub(crate) parents: &'static [&'static str],
    /// Allowed only somewhere inside this element.
    pub(crate) ancestor: Option<&'static str>,
}

const HTML_TO_XML_ATTRS: &[&str] = &[
    "outputtype",
    "advancedxmlescape",
    "usecdata",
    "specialentities",
    "unicodechars",
    "nbsp-to-sp",
    "omitunknowntags",
    "treatunknowntagsascontent",
    "omitdeprtags",
    "treatdeprtagsascontent",
    "omitxmldecl",
    "omitcomments",
    "omithtmlenvelope",
    "useemptyelementtags",
    "allowmultiwordattributes",
    "allowhtmlinsideattributes",
    "namespacesaware",
    "hyphenreplacement",
    "prunetags",
    "booleanatts",
];

pub(crate) fn spec(name: &str) -> Option<Spec> {
    let s = |kind, attrs, required, children| Spec {
        kind,
        attrs,
        required,
        children,
        parents: &[],
        ancestor: None,
    };
    Some(match name {
        "config" => s(
            Kind::Config,
            &["charset", "scriptlang", "obey-robots-txt"],
            &[],
            Children::Any,
        ),
        "var-def" => s(
            Kind::VarDef,
            &["name", "overwrite"],
            &["name"],
            Children::Any,
        ),
        "var" => s(Kind::Var, &["name"], &["name"], Children::None),
        "def" => s(
            Kind::Def,
            &["var", "value", "default"],
            &["var"],
            Children::Any,
        ),
        "set" => s(
            Kind::Set,
            &["var", "value", "default"],
            &["var"],
            Children::Any,
        ),
        "get" => s(Kind::Get, &["var"], &["var"], Children::None),
        "empty" => s(Kind::Empty, &[], &[], Children::Any),
        "text" => s(Kind::Text, &["charset", "delimiter"], &[], Children::Any),
        "template" => s(Kind::Template, &["language"], &[], Children::Any),
        "http" => s(
            Kind::Http,
            &[
                "url",
                "method",
                "follow-redirects",
                "ignore-response-body",
                "retry-attempts",
                "retry-delay",
                "retry-delay-factor",
                "content-type",
                "charset",
                "username",
                "password",
                "cookie-policy",
            ],
            &["url"],
            Children::Any,
        ),
        "http-param" => Spec {
            ancestor: Some("http"),
            ..s(
                Kind::HttpParam,
                &["name", "isfile", "filename", "contenttype"],
                &["name"],
                Children::Any,
            )
        },
        "http-header" => Spec {
            ancestor: Some("http"),
            ..s(Kind::HttpHeader, &["name"], &["name"], Children::Any)
        },
        "html-to-xml" => s(Kind::HtmlToXml, HTML_TO_XML_ATTRS, &[], Children::Any),
        "xpath" => s(Kind::XPath, &["expression"], &[], Children::Any),
        "regexp" => s(
            Kind::Regexp,
            &[
                "replace",
                "max",
                "flag-caseinsensitive",
                "flag-multiline",
                "flag-dotall",
                "flag-unicodecase",
                "flag-canoneq",
            ],
            &[],
            Children::Only(
                &["regexp-pattern", "regexp-source"],
                &["regexp-pattern", "regexp-source", "regexp-result"],
            ),
        ),
        "regexp-pattern" | "regexp-source" | "regexp-result" => Spec {
            parents: &["regexp"],
            ..s(
                match name {
                    "regexp-pattern" => Kind::RegexpPattern,
                    "regexp-source" => Kind::RegexpSource,
                    _ => Kind::RegexpResult,
                },
                &[],
                &[],
                Children::Any,
            )
        },
        "loop" => s(
            Kind::Loop,
            &["item", "index", "maxloops", "filter", "empty"],
            &[],
            Children::Only(&["list", "body"], &["list", "body"]),
        ),
        "list" => Spec {
            parents: &["loop"],
            ..s(Kind::List, &[], &[], Children::Any)
        },
        "body" => Spec {
            parents: &["loop", "try"],
            ..s(Kind::Body, &[], &[], Children::Any)
        },
        "while" => s(
            Kind::While,
            &["condition", "index", "maxloops", "empty"],
            &["condition"],
            Children::Any,
        ),
        "case" => s(Kind::Case, &[], &[], Children::Case),
        "if" => Spec {
            parents: &["case"],
            ..s(Kind::If, &["condition"], &["condition"], Children::Any)
        },
        "else" => Spec {
            parents: &["case"],
            ..s(Kind::Else, &[], &[], Children::Any)
        },
        "function" => s(Kind::Function, &["name"], &["name"], Children::Any),
        "return" => Spec {
            ancestor: Some("function"),
            ..s(Kind::Return, &[], &[], Children::Any)
        },
        "call" => s(Kind::Call, &["name"], &["name"], Children::Any),
        "call-param" => Spec {
            ancestor: Some("call"),
            ..s(Kind::CallParam, &["name"], &["name"], Children::Any)
        },
        "file" => s(
            Kind::File,
            &[
                "path",
                "action",
                "type",
                "charset",
                "listfilter",
                "listfiles",
                "listdirs",
                "listrecursive",
            ],
            &["path"],
            Children::Any,
        ),
        "json-to-xml" => s(Kind::JsonToXml, &["tag"], &[], Children::Any),
        "xml-to-json" => s(Kind::XmlToJson, &[], &[], Children::Any),
        "try" => s(
            Kind::Try,
            &[],
            &[],
            Children::Only(&["body", "catch"], &["body", "catch"]),
        ),
        "catch" => Spec {
            parents: &["try"],
            ..s(Kind::Catch, &[], &[], Children::Any)
        },
        "exit" => s(Kind::Exit, &["condition", "message"], &[], Children::None),
        "sleep" => s(
            Kind::Sleep,
            &["milliseconds"],
            &["milliseconds"],
            Children::None,
        ),
        "script" => s(Kind::Script, &["language", "return"], &[], Children::Any),
        _ => return None,
    })
}

/// Web-Harvest processors harvest knows but does not run, with why.
pub(crate) fn unsupported(name: &str) -> Option<&'static str> {
    Some(match name {
        "include" => "a config must be self-contained (paste the included config's processors in)",
        "xquery" | "xq-param" | "xq-expression" => {
            "XQuery is not supported; use xpath (XPath 3.1) with loop and template"
        }
        "xslt" | "xml" | "stylesheet" => "XSLT is not supported; use xpath and template",
        "database" | "db-param" => {
            "sessions do not connect to databases; use the session's records or export"
        }
        "ftp" | "ftp-get" | "ftp-put" | "ftp-list" | "ftp-del" | "ftp-mkdir" | "ftp-rmdir" => {
            "FTP is not supported"
        }
        "mail" | "mail-attach" => "sending mail is not supported",
        "zip" | "zip-entry" => "zip archives are not supported",
        "tokenize" => "tokenize is not supported; use regexp",
        "value-of" => "value-of is not supported; use template with ${…}",
        "constant" => "constant is not supported; write the text directly",
        _ => return None,
    })
}
