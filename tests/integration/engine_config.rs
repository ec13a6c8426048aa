//! The scraper config language: examples/catalog.toml parses, bad configs are refused by field.

use std::collections::BTreeMap;

use harvest::engine::{ConfigError, ScrapeJob, compile, parse_config_text};
use harvest::job::Job;
use serde_json::{Value, json};

const CATALOG: &str = include_str!("../../examples/catalog.toml");

fn catalog() -> Value {
    parse_config_text(CATALOG).expect("examples/catalog.toml parses")
}

#[test]
fn design_example_config_parses_and_compiles() {
    let cfg = compile(&catalog(), &BTreeMap::new()).expect("examples/catalog.toml compiles");
    assert_eq!(cfg.name, "catalog");
    assert_eq!(
        cfg.start_urls,
        vec!["http://127.0.0.1:18080/index.html".to_string()]
    );
    assert_eq!(cfg.http.concurrency, 32);
    assert_eq!(cfg.http.per_host_concurrency, 16);
    assert_eq!(cfg.follow.len(), 2);
    assert_eq!(cfg.pages["product"].fields.len(), 5);
    assert!(
        ScrapeJob::default()
            .validate(&catalog(), &BTreeMap::new())
            .is_ok()
    );
    // The same config as JSON is the same config.
    let as_json = serde_json::to_string(&catalog()).unwrap();
    assert_eq!(parse_config_text(&as_json).unwrap(), catalog());
}

#[test]
fn params_override_vars() {
    let mut cfg = catalog();
    cfg["start_urls"] = json!(["http://127.0.0.1:1/{{category}}/index.html"]);
    let c = compile(&cfg, &BTreeMap::new()).unwrap();
    assert_eq!(c.start_urls[0], "http://127.0.0.1:1/all/index.html");
    let params = BTreeMap::from([("category".to_string(), "shoes".to_string())]);
    let c = compile(&cfg, &params).unwrap();
    assert_eq!(c.start_urls[0], "http://127.0.0.1:1/shoes/index.html");
}

type Mutation = fn(&mut Value);

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "no start urls",
            |c| c["start_urls"] = json!([]),
            "start_urls",
        ),
        (
            "start urls missing",
            |c| drop(c.as_object_mut().unwrap().remove("start_urls")),
            "start_urls",
        ),
        (
            "ftp start url",
            |c| c["start_urls"] = json!(["ftp://x/"]),
            "start_urls[0]",
        ),
        (
            "relative start url",
            |c| c["start_urls"] = json!(["/index.html"]),
            "start_urls[0]",
        ),
        (
            "start url not a string",
            |c| c["start_urls"] = json!([5]),
            "start_urls[0]",
        ),
        (
            "unknown top key",
            |c| c["star_urls"] = json!([]),
            "star_urls",
        ),
        (
            "unknown http key",
            |c| c["http"]["concurency"] = json!(3),
            "http.concurency",
        ),
        (
            "zero concurrency",
            |c| c["http"]["concurrency"] = json!(0),
            "http.concurrency",
        ),
        (
            "huge concurrency",
            |c| c["http"]["concurrency"] = json!(100000),
            "http.concurrency",
        ),
        (
            "negative delay",
            |c| c["http"]["delay_ms"] = json!(-1),
            "http.delay_ms",
        ),
        (
            "string timeout",
            |c| c["http"]["timeout_ms"] = json!("10s"),
            "http.timeout_ms",
        ),
        (
            "tiny timeout",
            |c| c["http"]["timeout_ms"] = json!(1),
            "http.timeout_ms",
        ),
        (
            "too many retries",
            |c| c["http"]["retries"] = json!(99),
            "http.retries",
        ),
        (
            "tiny body cap",
            |c| c["http"]["max_body_bytes"] = json!(10),
            "http.max_body_bytes",
        ),
        (
            "empty user agent",
            |c| c["http"]["user_agent"] = json!(" "),
            "http.user_agent",
        ),
        (
            "newline in user agent",
            |c| c["http"]["user_agent"] = json!("a\nb"),
            "http.user_agent",
        ),
        (
            "robots not bool",
            |c| c["http"]["obey_robots_txt"] = json!("yes"),
            "http.obey_robots_txt",
        ),
        (
            "zero max pages",
            |c| c["limits"]["max_pages"] = json!(0),
            "limits.max_pages",
        ),
        (
            "zero max records",
            |c| c["limits"]["max_records"] = json!(0),
            "limits.max_records",
        ),
        (
            "deep max depth",
            |c| c["limits"]["max_depth"] = json!(1_000_000),
            "limits.max_depth",
        ),
        (
            "unknown limits key",
            |c| c["limits"]["max_time"] = json!(5),
            "limits.max_time",
        ),
        (
            "bad follow selector",
            |c| c["follow"][0]["selector"] = json!("a[["),
            "follow[0].selector",
        ),
        (
            "empty follow selector",
            |c| c["follow"][1]["selector"] = json!(""),
            "follow[1].selector",
        ),
        (
            "follow to unknown page",
            |c| c["follow"][1]["page"] = json!("prodct"),
            "follow[1].page",
        ),
        (
            "unknown follow key",
            |c| c["follow"][0]["selectr"] = json!("a"),
            "follow[0].selectr",
        ),
        (
            "bad field selector",
            |c| c["pages"]["product"]["fields"]["title"] = json!("h1 >"),
            "pages.product.fields.title.selector",
        ),
        (
            "bad regex",
            |c| c["pages"]["product"]["fields"]["price"]["regex"] = json!("(["),
            "pages.product.fields.price.regex",
        ),
        (
            "bad type",
            |c| c["pages"]["product"]["fields"]["price"]["type"] = json!("float"),
            "pages.product.fields.price.type",
        ),
        (
            "unknown field key",
            |c| c["pages"]["product"]["fields"]["sku"]["atr"] = json!("x"),
            "pages.product.fields.sku.atr",
        ),
        (
            "field not string or table",
            |c| c["pages"]["product"]["fields"]["sku"] = json!(3),
            "pages.product.fields.sku",
        ),
        (
            "all not bool",
            |c| c["pages"]["product"]["fields"]["tags"]["all"] = json!("yes"),
            "pages.product.fields.tags.all",
        ),
        (
            "absolute number",
            |c| c["pages"]["product"]["fields"]["price"]["absolute_url"] = json!(true),
            "pages.product.fields.price.absolute_url",
        ),
        (
            "field without selector",
            |c| c["pages"]["product"]["fields"]["sku"] = json!({"type": "string"}),
            "pages.product.fields.sku.selector",
        ),
        (
            "bad item selector",
            |c| c["pages"]["product"]["item"] = json!("::"),
            "pages.product.item",
        ),
        (
            "no fields",
            |c| c["pages"]["product"]["fields"] = json!({}),
            "pages.product.fields",
        ),
        (
            "unknown page key",
            |c| c["pages"]["product"]["itme"] = json!("x"),
            "pages.product.itme",
        ),
        (
            "unknown var",
            |c| c["start_urls"] = json!(["http://{{host}}/"]),
            "start_urls[0]",
        ),
        (
            "unclosed var",
            |c| c["http"]["user_agent"] = json!("bot {{name"),
            "http.user_agent",
        ),
        (
            "var of a table",
            |c| c["vars"]["x"] = json!({"a": 1}),
            "vars.x",
        ),
        (
            "bad field xpath",
            |c| c["pages"]["product"]["fields"]["title"] = json!({"xpath": "//h1["}),
            "pages.product.fields.title.xpath",
        ),
        (
            "empty field xpath",
            |c| c["pages"]["product"]["fields"]["title"] = json!({"xpath": " "}),
            "pages.product.fields.title.xpath",
        ),
        (
            "selector and xpath",
            |c| c["pages"]["product"]["fields"]["sku"]["xpath"] = json!("//td"),
            "pages.product.fields.sku",
        ),
        (
            "xpath with attr",
            |c| c["pages"]["product"]["fields"]["image"] = json!({"xpath": "//img", "attr": "src"}),
            "pages.product.fields.image.attr",
        ),
        (
            "xpath in an item page",
            |c| {
                c["pages"]["product"]["item"] = json!("main");
                c["pages"]["product"]["fields"]["sku"] = json!({"xpath": "//td/text()"});
            },
            "pages.product.fields.sku.xpath",
        ),
        (
            "bad follow xpath",
            |c| c["follow"][0] = json!({"xpath": "//a/@@href"}),
            "follow[0].xpath",
        ),
        (
            "follow xpath with attr",
            |c| c["follow"][0] = json!({"xpath": "//a/@href", "attr": "href"}),
            "follow[0].attr",
        ),
        (
            "follow selector and xpath",
            |c| c["follow"][0]["xpath"] = json!("//a/@href"),
            "follow[0]",
        ),
        (
            "follow with neither",
            |c| c["follow"][0] = json!({"page": "product"}),
            "follow[0].selector",
        ),
        (
            "unknown start page",
            |c| c["start_page"] = json!("list"),
            "start_page",
        ),
    ];
    assert!(cases.len() >= 20);
    let job = ScrapeJob::default();
    for (name, mutate, path) in cases {
        let mut cfg = catalog();
        mutate(&mut cfg);
        let err = compile(&cfg, &BTreeMap::new())
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        match &err {
            ConfigError::Field { path: p, .. } => assert_eq!(p, path, "{name}: {err}"),
            other => panic!("{name}: expected an error about {path}, got {other}"),
        }
        let msg = job.validate(&cfg, &BTreeMap::new()).expect_err(name);
        assert!(
            msg.to_string().contains(path),
            "{name}: validate said {msg:?}"
        );
    }
}

#[test]
fn bad_texts_are_refused() {
    assert!(matches!(
        parse_config_text("name = "),
        Err(ConfigError::Syntax(_))
    ));
    assert!(matches!(
        parse_config_text("{\"name\": }"),
        Err(ConfigError::Syntax(_))
    ));
    assert!(matches!(
        parse_config_text("[1, 2]"),
        Err(ConfigError::Syntax(_))
    ));
}

/// Issue 15: a 10 KB variable referenced 20,000 times in a 100 KB config expanded to 200 MB.
/// Substitution stops at the cap, names the field and the variable, and never holds more than
/// the cap.
#[test]
fn substitution_amplification_is_refused_naming_the_field() {
    use harvest::engine::config::{MAX_EXPANDED_BYTES, MAX_VAR_BYTES};
    let mut cfg = catalog();
    cfg["name"] = json!("{{v}}".repeat(20_000));
    cfg["vars"] = json!({ "v": "x".repeat(10_000) });
    let started = std::time::Instant::now();
    let err = compile(&cfg, &BTreeMap::new()).unwrap_err();
    assert_eq!(err.path(), Some("name"), "{err}");
    let m = err.to_string();
    assert!(
        m.contains("{{v}}") && m.contains(&MAX_EXPANDED_BYTES.to_string()),
        "{m}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "refusing took {:?}",
        started.elapsed()
    );

    // One value over the per-value cap, even referenced once, from a param.
    let mut cfg = catalog();
    cfg["name"] = json!("{{big}}");
    let params = BTreeMap::from([("big".to_string(), "y".repeat(MAX_VAR_BYTES + 1))]);
    let err = compile(&cfg, &params).unwrap_err();
    assert_eq!(err.path(), Some("name"), "{err}");
    assert!(err.to_string().contains("\"big\""), "{err}");

    // Many references spread over many fields count together.
    let mut cfg = catalog();
    cfg["vars"] = json!({ "v": "z".repeat(MAX_VAR_BYTES) });
    cfg["start_urls"] = json!(vec!["http://127.0.0.1:1/{{v}}"; 40]);
    let err = compile(&cfg, &BTreeMap::new()).unwrap_err();
    assert!(
        err.path().is_some_and(|p| p.starts_with("start_urls[")),
        "{err}"
    );

    // Under both caps it substitutes as before.
    let mut cfg = catalog();
    cfg["vars"] = json!({ "v": "w".repeat(MAX_VAR_BYTES) });
    cfg["name"] = json!("{{v}}{{v}}");
    let c = compile(&cfg, &BTreeMap::new()).expect("two 64 KiB values fit");
    assert_eq!(c.name.len(), 2 * MAX_VAR_BYTES);
}

#[test]
fn oversized_configs_and_rule_counts_are_refused() {
    use harvest::engine::config::{MAX_CONFIG_BYTES, MAX_FOLLOW_RULES, MAX_REGEXES};
    let mut cfg = catalog();
    cfg["name"] = json!("n".repeat(MAX_CONFIG_BYTES));
    let err = compile(&cfg, &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    let err =
        parse_config_text(&format!("name = \"{}\"", "n".repeat(MAX_CONFIG_BYTES))).unwrap_err();
    assert!(err.to_string().contains("more than"), "{err}");

    let mut cfg = catalog();
    cfg["follow"] = json!(vec![json!({"selector": "a"}); MAX_FOLLOW_RULES + 1]);
    let err = compile(&cfg, &BTreeMap::new()).unwrap_err();
    assert_eq!(err.path(), Some("follow"), "{err}");

    let mut cfg = catalog();
    let fields: serde_json::Map<String, Value> = (0..=MAX_REGEXES)
        .map(|i| (format!("f{i}"), json!({"selector": "p", "regex": "[0-9]+"})))
        .collect();
    cfg["pages"]["product"]["fields"] = Value::Object(fields);
    let err = compile(&cfg, &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("regexes"), "{err}");

    let mut cfg = catalog();
    cfg["pages"]["product"]["fields"]["title"] = json!("p".repeat(5000));
    let err = compile(&cfg, &BTreeMap::new()).unwrap_err();
    assert_eq!(
        err.path(),
        Some("pages.product.fields.title.selector"),
        "{err}"
    );
}

/// Issue 15: 20 regexes `\w{150}`…`\w{169}` took 3.8 s and 200 MB to compile. Each is now over
/// the compiled-size limit and the first one refuses the config.
#[test]
fn costly_regexes_are_refused_by_their_compiled_size() {
    let mut cfg = catalog();
    let fields: serde_json::Map<String, Value> = (150..170)
        .map(|n| {
            (
                format!("f{n}"),
                json!({"selector": "p", "regex": format!(r"\w{{{n}}}")}),
            )
        })
        .collect();
    cfg["pages"]["product"]["fields"] = Value::Object(fields);
    let err = compile(&cfg, &BTreeMap::new()).unwrap_err();
    assert_eq!(err.path(), Some("pages.product.fields.f150.regex"), "{err}");
    assert!(err.to_string().contains("too large once compiled"), "{err}");
    // An ordinary extraction regex stays well inside it.
    let mut cfg = catalog();
    cfg["pages"]["product"]["fields"]["price"] =
        json!({"selector": "p", "regex": r"(\d+(?:[.,]\d{1,2})?)\s*(?:EUR|USD|€|\$)"});
    compile(&cfg, &BTreeMap::new()).expect("an ordinary regex compiles");
}

#[test]
fn validation_past_its_time_limit_is_refused() {
    let err =
        harvest::engine::compile_within(&catalog(), &BTreeMap::new(), std::time::Duration::ZERO)
            .unwrap_err();
    assert!(err.to_string().contains("took longer than"), "{err}");
    harvest::engine::compile_within(
        &catalog(),
        &BTreeMap::new(),
        harvest::engine::config::VALIDATION_TIME_LIMIT,
    )
    .expect("the catalog validates in time");
}
