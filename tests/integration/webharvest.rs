//! Web-Harvest configs as sessions: the examples in `examples/webharvest/` against the generated
//! shop through `WebHarvestJob`, and the bad inputs as the queue sees them (refused by
//! `validate` with a line and column, or ending FAILED with the processor's path).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sitegen::{Site, SiteOptions, serve};
use async_trait::async_trait;
use harvest::engine::config::HttpSettings;
use harvest::engine::{MemoryCrawlState, NetGuard};
use harvest::job::{
    CheckpointSink, CommitError, Job, JobContext, JobOutcome, Retry, StopReason, StopSignal,
};
use harvest::session::{ClientContext, JobSpec, Session, SessionId, SessionOptions, Timestamp};
use harvest::store::{CheckpointBatch, ResumeState};
use harvest::webharvest::{
    RunOutput, VarValue, WebHarvestJob, WebHarvestSettings, is_webharvest_config,
};
use serde_json::Value;

const CATALOG: &str = include_str!("../../examples/webharvest/catalog.xml");
const FUNCTIONS: &str = include_str!("../../examples/webharvest/functions.xml");
const SPECIALS: &str = include_str!("../../examples/webharvest/specials.xml");
const SHOP_21: &str = include_str!("../../examples/webharvest/shop-2.1.xml");

/// Keeps every committed batch, with when it came.
#[derive(Default)]
struct Sink {
    batches: Mutex<Vec<(Instant, CheckpointBatch)>>,
}

#[async_trait]
impl CheckpointSink for Sink {
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), CommitError> {
        self.batches.lock().unwrap().push((Instant::now(), batch));
        Ok(())
    }
}

struct Ran {
    outcome: JobOutcome,
    output: Option<RunOutput>,
    committed: Vec<(Instant, CheckpointBatch)>,
    started: Instant,
    ended: Instant,
}

impl Ran {
    fn var(&self, name: &str) -> &VarValue {
        let out = self.output.as_ref().expect("the run left its variables");
        out.variables
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}: {:?}", out.variables.keys()))
    }

    fn text(&self, name: &str) -> &str {
        match self.var(name) {
            VarValue::Text(t) => t,
            other => panic!("{name} is {other:?}"),
        }
    }

    fn list(&self, name: &str) -> &[String] {
        match self.var(name) {
            VarValue::List(l) => l,
            other => panic!("{name} is {other:?}"),
        }
    }

    fn completed(&self) {
        match &self.outcome {
            JobOutcome::Completed(_) => {}
            JobOutcome::Failed { error, .. } => panic!("FAILED: {}: {}", error.kind, error.message),
            JobOutcome::Stopped(_) => panic!("stopped"),
        }
    }

    /// Committed batches plus the final one.
    fn batches(&self) -> Vec<&CheckpointBatch> {
        let last = match &self.outcome {
            JobOutcome::Completed(b) | JobOutcome::Stopped(b) => b,
            JobOutcome::Failed { batch, .. } => batch,
        };
        self.committed
            .iter()
            .map(|(_, b)| b)
            .chain(std::iter::once(last))
            .collect()
    }

    fn pages(&self) -> u64 {
        self.batches().iter().map(|b| b.pages).sum()
    }
}

async fn shop() -> Site {
    serve(SiteOptions {
        products: 30,
        per_list: 10,
        specials: true,
        tree: 0,
    })
    .await
    .expect("the shop starts")
}

fn settings(export: Option<&std::path::Path>) -> WebHarvestSettings {
    WebHarvestSettings {
        export_dir: export.map(|p| p.to_path_buf()),
        http: HttpSettings {
            timeout_ms: 5_000,
            ..HttpSettings::default()
        },
        ..WebHarvestSettings::default()
    }
}

fn session(xml: &str, params: &[(&str, &str)]) -> Session {
    Session::pending(
        SessionId::parse("wh-session").expect("id"),
        ClientContext::of("tests"),
        JobSpec {
            config: Value::String(xml.to_string()).into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent: None,
        },
        SessionOptions::default(),
        Timestamp::now(),
    )
}

async fn run_job(job: &WebHarvestJob, session: Session, stop: StopSignal) -> Ran {
    let sink = Arc::new(Sink::default());
    let ctx = JobContext {
        session,
        resume: ResumeState::default(),
        state: Arc::new(MemoryCrawlState::new()),
        sink: sink.clone(),
        stop,
    };
    let started = Instant::now();
    let (outcome, output) = tokio::time::timeout(Duration::from_secs(60), job.run_session(ctx))
        .await
        .expect("the session ends within 60 s");
    let ended = Instant::now();
    let committed = std::mem::take(&mut *sink.batches.lock().unwrap());
    Ran {
        outcome,
        output,
        committed,
        started,
        ended,
    }
}

async fn run_example(xml: &str, site: &Site, export: Option<&std::path::Path>) -> Ran {
    let job = WebHarvestJob::new(settings(export));
    job.validate(&Value::String(xml.into()), &BTreeMap::new())
        .expect("the example validates");
    run_job(
        &job,
        session(xml, &[("base", site.base_url())]),
        StopSignal::new(),
    )
    .await
}

#[tokio::test]
async fn example_catalog_collects_every_product_and_writes_its_csv() {
    let site = shop().await;
    let export = tempfile::tempdir().unwrap();
    let r = run_example(CATALOG, &site, Some(export.path())).await;
    r.completed();
    let titles: Vec<String> = (0..30).map(|i| format!("Product {i}")).collect();
    assert_eq!(r.list("titles"), titles);
    assert_eq!(r.text("productCount"), "30");
    assert_eq!(r.list("productLinks").len(), 30);
    assert_eq!(
        r.text("pageUrl"),
        "",
        "the walk ended at the last list page"
    );
    assert_eq!(r.pages(), 33, "3 list pages and 30 products");
    let csv = std::fs::read_to_string(export.path().join("tests/wh-session/catalog.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 31);
    assert_eq!(lines[0], "title,price,sku");
    assert_eq!(lines[8], "Product 7,7.07,SKU-000007");
    assert!(
        r.output.as_ref().unwrap().processors > 30 * 10,
        "processors are counted"
    );

    // A new attempt starts over in a clean directory: the CSV is not appended to twice.
    let again = run_example(CATALOG, &site, Some(export.path())).await;
    again.completed();
    let csv = std::fs::read_to_string(export.path().join("tests/wh-session/catalog.csv")).unwrap();
    assert_eq!(csv.lines().count(), 31);
}

#[tokio::test]
async fn example_functions_returns_the_items_of_every_page() {
    let site = shop().await;
    let r = run_example(FUNCTIONS, &site, None).await;
    r.completed();
    assert_eq!(r.text("titleCount"), "30");
    assert_eq!(r.text("firstAndLast"), "Product 0 to Product 29");
    assert!(
        !r.output.as_ref().unwrap().variables.contains_key("content"),
        "the function's variables stay in the function"
    );
}

#[tokio::test]
async fn example_specials_catches_each_failure() {
    let site = shop().await;
    let export = tempfile::tempdir().unwrap();
    let r = run_example(SPECIALS, &site, Some(export.path())).await;
    r.completed();
    let results = r.list("results");
    assert_eq!(results.len(), 6, "{results:#?}");
    assert_eq!(results[0], "/private/secret.html: Secret");
    assert_eq!(results[1], "/special/latin1.html: Café crème");
    assert_eq!(results[2], "/special/flaky.html: Flaky");
    assert!(
        results[3].starts_with("/special/loop-a: failed (GET http://127.0.0.1:")
            && results[3].contains("redirect loop"),
        "{}",
        results[3]
    );
    assert!(
        results[4].starts_with("/special/huge.html: failed (")
            && results[4].contains("larger than max_body_bytes"),
        "{}",
        results[4]
    );
    assert_eq!(results[5], "/special/data.json: JSON, not html");
    assert_eq!(r.text("fetchedCount"), "4");
    let retries: u64 = r.batches().iter().map(|b| b.usage.retries).sum();
    assert!(retries >= 1, "the flaky page was retried");
    let log: Vec<&str> = r
        .batches()
        .iter()
        .flat_map(|b| b.log.iter().map(|l| l.message.as_str()))
        .collect();
    assert!(
        log.iter().any(|l| l.starts_with(
            "try caught: config/var-def[3]/loop/body/try/body/empty/var-def/http: GET"
        )),
        "{log:#?}"
    );
}

#[tokio::test]
async fn robots_txt_is_obeyed_when_the_config_asks() {
    let site = shop().await;
    let xml = SPECIALS.replace(
        "<config charset=\"UTF-8\">",
        "<config charset=\"UTF-8\" obey-robots-txt=\"true\">",
    );
    let export = tempfile::tempdir().unwrap();
    let r = run_example(&xml, &site, Some(export.path())).await;
    r.completed();
    assert!(
        r.list("results")[0].contains("robots.txt disallows this URL"),
        "{:?}",
        r.list("results")
    );
    let blocked: u64 = r.batches().iter().map(|b| b.usage.robots_blocked).sum();
    assert_eq!(blocked, 1);
}

#[tokio::test]
async fn example_shop_in_2_1_style() {
    let site = shop().await;
    let r = run_example(SHOP_21, &site, None).await;
    r.completed();
    assert_eq!(r.list("names").len(), 10);
    assert_eq!(r.list("prices").len(), 10);
    assert_eq!(r.text("cheapest"), "0.00");
    assert_eq!(
        r.text("summary"),
        r#"{"shop":{"products":10,"cheapest":0}}"#
    );
    assert_eq!(r.text("base"), site.base_url());
    assert!(r.text("firstPage").starts_with("dropped"));
}

#[test]
fn validate_refuses_bad_configs_naming_where_and_what() {
    let job = WebHarvestJob::default();
    let v = |xml: &str| {
        job.validate(&Value::String(xml.into()), &BTreeMap::new())
            .map_err(|e| e.to_string())
    };
    assert_eq!(
        v("<config>\n  <var-def name=\"a\">\n    <fetch/>\n  </var-def>\n</config>").unwrap_err(),
        "line 3, column 5: unknown processor `fetch`"
    );
    assert_eq!(
        v("<config><loop maxloop=\"3\"><list/><body/></loop></config>").unwrap_err(),
        "line 1, column 9: unknown attribute `maxloop` on `loop` (it takes item, index, maxloops, filter, empty)"
    );
    let e = v("<config>\n<var-def name=\"a\">x</config>").unwrap_err();
    assert!(e.starts_with("line 2, column 20: malformed XML"), "{e}");
    let e = v("<config><script>String s = \"x\";</script></config>").unwrap_err();
    assert!(
        e.contains("line 1, column 9: config/script: BeanShell syntax is not supported"),
        "{e}"
    );
    assert_eq!(
        job.validate(&serde_json::json!({"name": "x"}), &BTreeMap::new())
            .unwrap_err()
            .to_string(),
        "a Web-Harvest config is a string of XML"
    );
    for ex in [CATALOG, FUNCTIONS, SPECIALS, SHOP_21] {
        assert!(is_webharvest_config(ex));
        v(ex).expect("the examples validate");
    }
    assert!(!is_webharvest_config("name = \"toml\""));
}

#[tokio::test]
async fn a_failing_processor_ends_failed_with_its_path() {
    let site = shop().await;
    let xml = "<config>\n<loop item=\"p\"><list><template>/special/loop-a</template></list><body>\n  <http url=\"${base}${p}\"/>\n</body></loop>\n</config>";
    let job = WebHarvestJob::new(settings(None));
    let r = run_job(
        &job,
        session(xml, &[("base", site.base_url())]),
        StopSignal::new(),
    )
    .await;
    let JobOutcome::Failed {
        error,
        retry,
        batch,
    } = &r.outcome
    else {
        panic!("not FAILED: {:?}", r.outcome);
    };
    assert_eq!(error.kind, "http_failed");
    assert!(
        error
            .message
            .starts_with("config/loop/body/http: GET http://127.0.0.1:"),
        "{}",
        error.message
    );
    assert!(
        error.message.ends_with("(line 3, column 3)"),
        "{}",
        error.message
    );
    assert_eq!(*retry, Retry::Never, "a redirect loop will not go away");
    assert!(
        batch
            .log
            .iter()
            .any(|l| l.level == "error" && l.message == error.message)
    );
    assert_eq!(
        r.text("base"),
        site.base_url(),
        "variables are kept on failure"
    );
}

#[tokio::test]
async fn the_network_guard_refuses_loopback() {
    let site = shop().await;
    let job = WebHarvestJob::new(WebHarvestSettings {
        guard: Some(NetGuard::default()),
        ..settings(None)
    });
    let r = run_job(
        &job,
        session(CATALOG, &[("base", site.base_url())]),
        StopSignal::new(),
    )
    .await;
    let JobOutcome::Failed { error, .. } = &r.outcome else {
        panic!("not FAILED: {:?}", r.outcome);
    };
    assert!(error.message.contains("network guard"), "{}", error.message);
    assert_eq!(site.total_hits(), 0);
}

const PACED: &str = r#"<config>
    <var-def name="first">kept</var-def>
    <var-def name="seen">
        <loop item="i" index="n">
            <list><template>a</template><template>b</template><template>c</template><template>d</template><template>e</template><template>f</template></list>
            <body>
                <empty><http url="${base}/product/${n}.html"/></empty>
                <sleep milliseconds="300"/>
                <var name="n"/>
            </body>
        </loop>
    </var-def>
</config>"#;

#[tokio::test]
async fn progress_is_committed_while_it_runs() {
    let site = shop().await;
    let job = WebHarvestJob::new(settings(None));
    let r = run_job(
        &job,
        session(PACED, &[("base", site.base_url())]),
        StopSignal::new(),
    )
    .await;
    r.completed();
    assert_eq!(r.list("seen"), ["1", "2", "3", "4", "5", "6"]);
    let during: Vec<&(Instant, CheckpointBatch)> =
        r.committed.iter().filter(|(_, b)| b.pages > 0).collect();
    assert!(
        during.len() >= 2,
        "progress every ~500 ms: {} commits",
        during.len()
    );
    assert!(during[0].0 < r.ended - Duration::from_millis(500));
    assert_eq!(r.pages(), 6);
}

#[tokio::test]
async fn cancel_mid_run_stops_promptly_with_the_variables_so_far() {
    let site = shop().await;
    let job = WebHarvestJob::new(settings(None));
    let stop = StopSignal::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s2.stop(StopReason::Cancelled);
    });
    let r = run_job(&job, session(PACED, &[("base", site.base_url())]), stop).await;
    assert!(
        matches!(r.outcome, JobOutcome::Stopped(_)),
        "{:?}",
        r.outcome
    );
    assert!(
        r.ended - r.started < Duration::from_secs(2),
        "took {:?}",
        r.ended - r.started
    );
    assert_eq!(r.text("first"), "kept");
    let pages = r.pages();
    assert!((1..6).contains(&pages), "{pages} pages before the cancel");
}

/// Issue 15: a regex over the compiled-size limit (`\w{150}`, about 10 MiB and a second to
/// compile) is refused at submission, and checking past the time limit refuses the config.
#[test]
fn costly_webharvest_patterns_are_refused() {
    let xml = r#"<config><regexp><regexp-pattern>\w{150}</regexp-pattern><regexp-source>x</regexp-source></regexp></config>"#;
    let started = std::time::Instant::now();
    let err = harvest::webharvest::parse(xml).unwrap_err().to_string();
    assert!(err.contains("does not compile"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusing took {:?}",
        started.elapsed()
    );
    let ok = r#"<config><regexp><regexp-pattern>([0-9]+)</regexp-pattern><regexp-source>x1</regexp-source></regexp></config>"#;
    harvest::webharvest::parse(ok).expect("an ordinary pattern compiles");
    let err = harvest::webharvest::parse_within(ok, Duration::ZERO)
        .unwrap_err()
        .to_string();
    assert!(err.contains("took longer than"), "{err}");
}
