//! Fuzzing on stable Rust with proptest (issue 15): hostile configs (TOML and JSON text, scraper
//! configs with `{{var}}` substitution, Web-Harvest XML), session ids, and the API's query
//! strings, paths and cursors, with record encoding as the API streams it (CSV and JSON lines).
//!
//! Every property says "no panic, an answer of the documented kind, in bounded time". Case counts
//! are fixed (not taken from `PROPTEST_CASES`) so the whole file runs in well under two minutes
//! of a debug build on two cores; a failure prints the shrunk input.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harvest::engine::config::{MAX_EXPANDED_BYTES, MAX_VAR_BYTES, VALIDATION_TIME_LIMIT};
use harvest::engine::{compile, compile_within, parse_config_text};
use harvest::session::SessionId;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// Longest one generated input may take to parse or validate (generous: a debug build on a
/// loaded machine; the inputs are small).
const PER_CASE: Duration = Duration::from_secs(5);

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunConfig {
        cases,
        failure_persistence: None,
        ..RunConfig::default()
    })
}

fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    prop_assert!(took < PER_CASE, "{what} took {took:?}");
    Ok(out)
}

/// Pieces of config text: TOML and JSON syntax, variables, and things that once broke parsers.
fn text_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name = \"x\"\n".to_string()),
        Just("start_urls = [\"http://example.invalid/\"]\n".to_string()),
        Just("[vars]\nv = \"{{v}}\"\n".to_string()),
        Just("[pages.p]\nfields.t = \"h1\"\n".to_string()),
        Just("[[follow]]\nselector = \"a\"\n".to_string()),
        Just("{\"start_urls\": [".to_string()),
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("\"\"\"".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("= ".to_string()),
        Just("\u{0}".to_string()),
        Just("é".to_string()),
        Just("\r\n".to_string()),
        "[ -~]{0,12}",
    ]
}

#[test]
fn config_text_never_panics() {
    let mut r = runner(512);
    let strategy = prop_oneof![
        any::<String>(),
        prop::collection::vec(text_piece(), 0..24).prop_map(|p| p.concat()),
    ];
    r.run(&strategy, |text| {
        let parsed = bounded("parse", || parse_config_text(&text))?;
        if let Ok(v) = parsed {
            prop_assert!(v.is_object(), "a parsed config is a table: {v}");
            bounded("compile", || {
                compile_within(&v, &BTreeMap::new(), VALIDATION_TIME_LIMIT)
            })?
            .ok();
        }
        Ok(())
    })
    .unwrap();
}

/// A string made of literal text and `{{name}}` references (some to unknown names, some
/// unclosed).
fn templated() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[a-z0-9 ./:]{0,8}",
            "[abc]".prop_map(|n| format!("{{{{{n}}}}}")),
            "[abc]".prop_map(|n| format!("{{{{ {n} }}}}")),
            Just("{{".to_string()),
            Just("{{zz}}".to_string()),
        ],
        0..12,
    )
    .prop_map(|p| p.concat())
}

/// CSS selectors, regexes and XPath expressions, valid and not.
fn expression() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("h1".to_string()),
        Just("a.next".to_string()),
        Just("a[[".to_string()),
        Just("::text".to_string()),
        Just("([0-9]+)".to_string()),
        Just("([".to_string()),
        Just(r"\w{20}".to_string()),
        Just(r"(a*)*b".to_string()),
        Just("//a/@href".to_string()),
        Just("//*[".to_string()),
        "[ -~]{0,16}",
    ]
}

fn field() -> impl Strategy<Value = Value> {
    (
        prop::option::of(expression()),
        prop::option::of(expression()),
        prop::option::of(expression()),
        prop::option::of(prop_oneof![
            Just("string"),
            Just("number"),
            Just("bool"),
            Just("weird")
        ]),
        any::<bool>(),
    )
        .prop_map(|(selector, xpath, regex, ty, all)| {
            let mut f = serde_json::Map::new();
            if let Some(s) = selector {
                f.insert("selector".into(), json!(s));
            }
            if let Some(x) = xpath {
                f.insert("xpath".into(), json!(x));
            }
            if let Some(r) = regex {
                f.insert("regex".into(), json!(r));
            }
            if let Some(t) = ty {
                f.insert("type".into(), json!(t));
            }
            f.insert("all".into(), json!(all));
            Value::Object(f)
        })
}

fn scraper_config() -> impl Strategy<Value = (Value, BTreeMap<String, String>)> {
    (
        prop::collection::btree_map("[abc]", "[a-z{}]{0,40}", 0..4),
        prop::collection::btree_map("[abcd]", "[a-z{}]{0,40}", 0..3),
        templated(),
        prop::collection::vec(templated(), 1..4),
        prop::collection::vec(prop::option::of(expression()), 0..4),
        prop::collection::btree_map("[a-e]", field(), 0..6),
        prop::option::of(expression()),
    )
        .prop_map(|(vars, params, name, urls, follow, fields, item)| {
            let start_urls: Vec<String> = urls
                .into_iter()
                .map(|u| format!("http://example.invalid/{u}"))
                .collect();
            let follow: Vec<Value> = follow
                .into_iter()
                .map(|s| match s {
                    Some(s) => json!({"selector": s, "page": "p"}),
                    None => json!({"xpath": "//a/@href"}),
                })
                .collect();
            let mut page = json!({ "fields": fields });
            if let Some(i) = item {
                page["item"] = json!(i);
            }
            let config = json!({
                "name": name,
                "vars": vars,
                "start_urls": start_urls,
                "start_page": "p",
                "follow": follow,
                "pages": { "p": page },
            });
            (config, params)
        })
}

#[test]
fn scraper_configs_validate_or_name_a_field_without_panicking() {
    let mut r = runner(256);
    r.run(&scraper_config(), |(config, params)| {
        let out = bounded("compile", || {
            compile_within(&config, &params, VALIDATION_TIME_LIMIT)
        })?;
        match out {
            Ok(c) => prop_assert!(c.name.len() <= MAX_EXPANDED_BYTES),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    })
    .unwrap();
}

/// Exactly the configs whose substituted strings fit the cap are accepted, whatever the mix of
/// reference count and value size, and a refusal names the field.
#[test]
fn substitution_is_accepted_exactly_within_the_cap() {
    let mut r = runner(96);
    let strategy = (1usize..4_000, 1usize..=MAX_VAR_BYTES / 64, 1usize..=64);
    r.run(&strategy, |(refs, unit, times)| {
        let len = unit * times;
        let config = json!({
            "name": "{{v}}".repeat(refs),
            "vars": { "v": "x".repeat(len) },
            "start_urls": ["http://example.invalid/"],
            "start_page": "p",
            "pages": { "p": { "fields": { "t": "h1" } } },
        });
        let out = bounded("compile", || compile(&config, &BTreeMap::new()))?;
        let expanded = refs * len;
        match out {
            Ok(c) => {
                prop_assert!(expanded <= MAX_EXPANDED_BYTES, "{expanded} bytes accepted");
                prop_assert_eq!(c.name.len(), expanded);
            }
            Err(e) => {
                prop_assert!(
                    expanded > MAX_EXPANDED_BYTES,
                    "{expanded} bytes refused: {e}"
                );
                prop_assert_eq!(e.path(), Some("name"));
            }
        }
        Ok(())
    })
    .unwrap();
}

/// Pieces of Web-Harvest XML.
fn xml_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("<config>".to_string()),
        Just("</config>".to_string()),
        Just("<var-def name=\"x\">".to_string()),
        Just("</var-def>".to_string()),
        Just("<http url=\"http://example.invalid/\"/>".to_string()),
        Just("<regexp><regexp-pattern>(a+)+</regexp-pattern><regexp-source>".to_string()),
        Just("</regexp-source></regexp>".to_string()),
        Just("<xpath expression=\"//a\">".to_string()),
        Just("</xpath>".to_string()),
        Just("<loop item=\"i\"><list>".to_string()),
        Just("</list><body>".to_string()),
        Just("</body></loop>".to_string()),
        Just("<![CDATA[".to_string()),
        Just("]]>".to_string()),
        Just("&amp;".to_string()),
        Just("&#0;".to_string()),
        Just("&#x110000;".to_string()),
        Just("&unknown;".to_string()),
        Just("${x}".to_string()),
        Just("<?xml version=\"1.0\"?>".to_string()),
        Just("<!DOCTYPE x [<!ENTITY a \"aaaa\">]>".to_string()),
        "[ -~]{0,10}",
    ]
}

#[test]
fn webharvest_xml_never_panics() {
    let mut r = runner(384);
    let strategy = prop_oneof![
        any::<String>().prop_map(|s| format!("<{s}")),
        prop::collection::vec(xml_piece(), 0..40).prop_map(|p| p.concat()),
    ];
    r.run(&strategy, |xml| {
        bounded("parse", || harvest::webharvest::parse(&xml))?.ok();
        // The same text through the dispatch a submission uses.
        bounded("kinds", || harvest::kinds::parse_config_text(&xml))?.ok();
        Ok(())
    })
    .unwrap();
}

#[test]
fn session_ids_parse_or_refuse_and_round_trip() {
    let mut r = runner(1024);
    let strategy = prop_oneof![any::<String>(), "[A-Za-z0-9._:/ -]{0,140}"];
    r.run(&strategy, |s| {
        if let Ok(id) = SessionId::parse(&s) {
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert!(!s.contains(".."), "{s:?}");
            prop_assert!(s.chars().count() <= 128);
        }
        Ok(())
    })
    .unwrap();
}

/// Percent-encodes every byte that is not unreserved, so any generated text reaches the server.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn query_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1001".to_string()),
        Just("18446744073709551616".to_string()),
        Just("csv".to_string()),
        Just("jsonl".to_string()),
        Just("json".to_string()),
        Just("PENDING".to_string()),
        Just("COMPLETED".to_string()),
        any::<String>(),
        "[ -~]{0,40}",
    ]
}

/// Query strings, cursors and paths against the real router: an answer of 200, 400 or 404,
/// never a 5xx or a dropped connection; a 200 in CSV or JSON lines parses back into as many
/// rows as records.
#[test]
fn api_queries_cursors_and_records_answer_without_server_errors() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(crate::api_support::start(crate::api_support::CONFIG));
    // A session with records whose data exercise CSV quoting (commas, quotes, newlines).
    let done = rt.block_on(async {
        let s = server
            .submit(json!({"config": {"name": "n", "records": 7, "per_checkpoint": 3}, "session_id": "fuzz-1"}))
            .await;
        let id = s["id"].as_str().unwrap().to_string();
        server.wait_terminal(&id).await;
        id
    });
    let mut r = runner(160);
    let strategy = (
        prop::collection::vec(
            (
                prop_oneof![
                    Just("limit".to_string()),
                    Just("cursor".to_string()),
                    Just("status".to_string()),
                    Just("client_id".to_string()),
                    Just("agent".to_string()),
                    Just("offset".to_string()),
                    Just("format".to_string()),
                    "[a-z]{1,6}",
                ],
                query_value(),
            ),
            0..5,
        ),
        prop_oneof![
            Just(done.clone()),
            Just("fuzz-2".to_string()),
            any::<String>(),
        ],
        0usize..3,
    );
    r.run(&strategy, |(pairs, id, route)| {
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let path = match route {
            0 => format!("/v1/sessions?{}", query.join("&")),
            1 => format!("/v1/sessions/{}/records?{}", encode(&id), query.join("&")),
            _ => format!("/v1/sessions/{}/log?{}", encode(&id), query.join("&")),
        };
        let resp = rt.block_on(async {
            tokio::time::timeout(PER_CASE, server.get(&path))
                .await
                .map_err(|_| TestCaseError::fail(format!("{path}: no answer in {PER_CASE:?}")))
        })?;
        let code = resp.status.as_u16();
        prop_assert!(
            matches!(code, 200 | 400 | 404),
            "{path}: {code} {}",
            resp.text
        );
        if code != 200 && !resp.text.is_empty() {
            prop_assert!(
                resp.json["error"]["code"].is_string(),
                "{path}: {}",
                resp.text
            );
        }
        if code == 200 && route == 1 {
            check_records_body(&path, &resp.content_type, &resp.text)?;
        }
        Ok(())
    })
    .unwrap();
    drop(server);
}

/// A records answer parses back: CSV rows of equal width, JSON lines each a JSON value.
fn check_records_body(path: &str, content_type: &str, text: &str) -> Result<(), TestCaseError> {
    if content_type.starts_with("text/csv") {
        let mut rows = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(text.as_bytes());
        let mut width = None;
        for row in rows.records() {
            let row = row.map_err(|e| TestCaseError::fail(format!("{path}: bad CSV: {e}")))?;
            let w = *width.get_or_insert(row.len());
            prop_assert_eq!(row.len(), w, "{}: ragged CSV", path);
        }
    } else if content_type.starts_with("application/x-ndjson")
        || content_type.starts_with("application/jsonl")
    {
        for line in text.lines() {
            prop_assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "{path}: bad JSON line {line:?}"
            );
        }
    } else {
        prop_assert!(
            serde_json::from_str::<Value>(text).is_ok(),
            "{path}: bad JSON {text:?}"
        );
    }
    Ok(())
}
