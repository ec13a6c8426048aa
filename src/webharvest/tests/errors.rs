//! Bad inputs: refused at parse time with a line and column, or failing at run time with the
//! processor's path; limits; cancellation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{host_settings, run, run_in, site};
use crate::job::{CheckpointSink, CommitError, StopReason, StopSignal};
use crate::store::CheckpointBatch;
use crate::webharvest::{FetchHost, Host, Limits, MAX_DEPTH, RunErrorKind, parse, run_program};

fn refused(xml: &str) -> crate::webharvest::ParseError {
    match parse(xml) {
        Ok(_) => panic!("accepted: {xml}"),
        Err(e) => e,
    }
}

#[test]
fn malformed_xml_gives_line_and_column() {
    let e = refused("<config>\n  <var-def name=\"a\">\n    <template>x</var-def>\n</config>");
    assert_eq!((e.line, e.column), (3, 16), "{e}");
    assert!(e.message.starts_with("malformed XML"), "{e}");
    let e = refused("<config>\n <var-def name=\"a>x</var-def></config>");
    assert!(e.message.starts_with("malformed XML"), "{e}");
    assert_eq!(e.line, 2, "{e}");
    let e = refused("");
    assert!(e.message.contains("empty"), "{e}");
    let e = refused("<config><x:y/></config>");
    assert!(e.message.contains("not declared"), "{e}");
}

#[test]
fn unknown_processors_and_attributes_are_named() {
    let e = refused("<config>\n  <var-def name=\"a\"><fetch url=\"x\"/></var-def>\n</config>");
    assert_eq!((e.line, e.column), (2, 21));
    assert_eq!(e.message, "unknown processor `fetch`");
    let e = refused("<config><http url=\"x\" proxy=\"y\"/></config>");
    assert_eq!((e.line, e.column), (1, 9));
    assert!(
        e.message.starts_with("unknown attribute `proxy` on `http`"),
        "{e}"
    );
    let e = refused("<config><xquery/></config>");
    assert!(e.message.contains("`xquery` is not supported"), "{e}");
    let e = refused("<config><include path=\"f.xml\"/></config>");
    assert!(e.message.contains("self-contained"), "{e}");
    let e = refused("<root/>");
    assert!(e.message.contains("must be <config>"), "{e}");
}

#[test]
fn structure_is_checked() {
    for (xml, want) in [
        ("<config><http/></config>", "needs the attribute `url`"),
        (
            "<config><body/></config>",
            "belongs directly inside `loop` or `try`",
        ),
        (
            "<config><loop><body/></loop></config>",
            "needs a `list` element",
        ),
        (
            "<config><loop><list/><body/><template/></loop></config>",
            "`loop` cannot contain `template`",
        ),
        (
            "<config><loop><list/>text<body/></loop></config>",
            "cannot contain text",
        ),
        (
            "<config><case><else/><if condition=\"1\"/></case></config>",
            "at least one `if`",
        ),
        (
            "<config><http-param name=\"a\"/></config>",
            "only inside `http`",
        ),
        ("<config><return/></config>", "only inside `function`"),
        (
            "<config><get var=\"a\"><template/></get></config>",
            "takes no body",
        ),
        ("<config><config/></config>", "must be the root"),
        (
            "<!DOCTYPE config [<!ENTITY a \"b\">]><config/>",
            "DOCTYPE is not allowed",
        ),
        ("<config>&bomb;</config>", "undefined entity"),
        (
            "<config><xpath expression=\"//a[\"/></config>",
            "does not compile",
        ),
        (
            "<config><regexp><regexp-pattern>([</regexp-pattern><regexp-source/></regexp></config>",
            "does not compile",
        ),
        ("<config charset=\"klingon\"/>", "unknown charset"),
    ] {
        let e = refused(xml);
        assert!(e.message.contains(want), "{xml}: {e}");
    }
}

#[test]
fn parsing_is_bounded() {
    let deep = format!(
        "<config>{}{}</config>",
        "<empty>".repeat(MAX_DEPTH + 1),
        "</empty>".repeat(MAX_DEPTH + 1)
    );
    assert!(refused(&deep).message.contains("nested deeper"));
    let big = format!(
        "<config>{}</config>",
        "x".repeat(crate::webharvest::MAX_CONFIG_BYTES)
    );
    assert!(refused(&big).message.contains("bytes"));
}

#[test]
fn beanshell_syntax_is_refused_with_what_to_write() {
    let e =
        refused("<config>\n  <script><![CDATA[\n    String x = \"a\";\n  ]]></script>\n</config>");
    assert_eq!((e.line, e.column), (2, 3));
    assert!(
        e.message
            .starts_with("config/script: BeanShell syntax is not supported (found `String x ="),
        "{e}"
    );
    assert!(e.message.contains("write `var x = …`"), "{e}");
    let e = refused("<config><script>Set s = new HashSet();</script></config>");
    assert!(e.message.contains("new Set()"), "{e}");
    let e = refused("<config><script>var s = new HashSet();</script></config>");
    assert!(
        e.message
            .contains("`new HashSet()` is Java; write `new Set()`"),
        "{e}"
    );
    let e = refused(
        "<config><var-def name=\"x\"><template>${s.length()}</template></var-def></config>",
    );
    assert!(e.message.contains("write `.length`"), "{e}");
    let e = refused("<config><while condition=\"${(String) x}\"/></config>");
    assert!(e.message.contains("attribute `condition`"), "{e}");
    let e = refused("<config><script>boolean ok(String u) { return true; }</script></config>");
    assert!(e.message.contains("function name(arg)"), "{e}");
    let e = refused("<config><script>for (String s : list) {}</script></config>");
    assert!(e.message.contains("for (const x of"), "{e}");
    // JavaScript that only looks like it.
    for ok in [
        "var x = 1; let y = 2; const z = x + y; if (x) { y = 3 } else if (y) { z }",
        "function f(a, b) { return typeof a === 'string' ? a : b; } f('String x = 1', 2)",
        "// String x = 1\n/* new HashSet() */ x = [1].length",
        "for (const s of [1]) {} for (var k in {}) {} class A { static m() {} get g() { return 1 } }",
    ] {
        parse(&format!(
            "<config><script><![CDATA[{ok}]]></script></config>"
        ))
        .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[tokio::test]
async fn a_runtime_error_names_the_processor_path() {
    let r = run(r#"
        <loop item="u"><list><template>/item/1.html</template></list><body><empty/></body></loop>
        <loop item="u"><list><template>/status/503</template></list><body>
            <http url="${base}${u}"/>
        </body></loop>
    "#)
    .await;
    let e = r.err();
    assert_eq!(e.kind, RunErrorKind::Http { retryable: true });
    assert!(
        e.message
            .starts_with("config/loop[2]/body/http: GET http://127.0.0.1:"),
        "{}",
        e.message
    );
    assert!(e.message.contains("HTTP status 503"), "{}", e.message);
    assert!(e.message.ends_with("(line 4, column 13)"), "{}", e.message);
}

#[tokio::test]
async fn file_paths_cannot_escape_the_session_directory() {
    for path in ["../outside.txt", "/etc/passwd", "a/../../b"] {
        let r = run(&format!("<file action=\"write\" path=\"{path}\">x</file>")).await;
        let e = r.err();
        assert_eq!(e.kind, RunErrorKind::Failed);
        assert!(
            e.message.starts_with("config/file: file path"),
            "{}",
            e.message
        );
        assert!(e.message.contains("stay in it"), "{}", e.message);
        assert!(!r.dir.path().join("outside.txt").exists());
    }
}

#[tokio::test]
async fn a_runaway_while_hits_the_default_maxloops() {
    let s = site().await;
    let limits = Limits {
        max_loops: 50,
        ..Limits::default()
    };
    let r = run_in(
        &s,
        "<config><while condition=\"true\"><template>x</template></while></config>",
        &[],
        limits,
        StopSignal::new(),
    )
    .await;
    let e = r.err();
    assert_eq!(e.kind, RunErrorKind::Limit("max_loops"));
    assert!(
        e.message.starts_with(
            "config/while: while stopped after 50 iterations, the default maxloops; set maxloops"
        ),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn deep_recursion_hits_the_call_depth() {
    let r = run(r#"
        <function name="down"><return><call name="down"/></return></function>
        <call name="down"/>
    "#)
    .await;
    let e = r.err();
    assert_eq!(e.kind, RunErrorKind::Limit("call_depth"), "{}", e.message);
    assert!(
        e.message.contains("calls nest deeper than 100"),
        "{}",
        e.message
    );
    assert!(
        e.message.starts_with("config/function/return/call: "),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_huge_variable_hits_the_memory_cap() {
    let s = site().await;
    let limits = Limits {
        max_variable_bytes: 1 << 20,
        ..Limits::default()
    };
    let xml = r#"<config>
        <var-def name="x">0123456789</var-def>
        <while condition="true" maxloops="100">
            <var-def name="x"><template>${x}${x}</template></var-def>
        </while>
    </config>"#;
    let r = run_in(&s, xml, &[], limits, StopSignal::new()).await;
    let e = r.err();
    assert_eq!(
        e.kind,
        RunErrorKind::Limit("variable_memory"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("variable memory cap (1048576 bytes)"),
        "{}",
        e.message
    );
    let x = e
        .output
        .variables
        .get("x")
        .expect("x is kept at its last size");
    assert!(matches!(x, crate::webharvest::VarValue::Text(t) if t.len() == 655_360));
}

#[tokio::test]
async fn html_to_xml_output_is_capped() {
    let s = site().await;
    let limits = Limits {
        max_html_xml_bytes: 500,
        ..Limits::default()
    };
    let r = run_in(
        &s,
        "<config><html-to-xml><http url=\"${base}/shop.html\"/></html-to-xml></config>",
        &[],
        limits,
        StopSignal::new(),
    )
    .await;
    assert_eq!(r.err().kind, RunErrorKind::Limit("html_to_xml_size"));
}

async fn stopped_promptly(body: &str) {
    let s = site().await;
    let stop = StopSignal::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s2.stop(StopReason::Cancelled);
    });
    let started = Instant::now();
    let r = run_in(
        &s,
        &format!("<config><var-def name=\"before\">b</var-def>{body}</config>"),
        &[],
        Limits::default(),
        stop,
    )
    .await;
    let e = r.err();
    assert_eq!(e.kind, RunErrorKind::Stopped, "{}", e.message);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(e.output.variables.contains_key("before"), "{:?}", e.output);
}

#[tokio::test]
async fn cancel_stops_an_http_request_in_flight() {
    stopped_promptly("<http url=\"${base}/slow\"/>").await;
}

#[tokio::test]
async fn cancel_stops_a_sleep() {
    stopped_promptly("<sleep milliseconds=\"60000\"/>").await;
}

#[tokio::test]
async fn cancel_stops_a_busy_loop_and_a_running_script() {
    stopped_promptly("<while condition=\"true\" maxloops=\"100000000\"><empty/></while>").await;
    stopped_promptly("<script>while (true) {}</script>").await;
}

struct LosingSink;

#[async_trait]
impl CheckpointSink for LosingSink {
    async fn commit(&self, _batch: CheckpointBatch) -> Result<(), CommitError> {
        Err(CommitError::LeaseLost)
    }
}

#[tokio::test]
async fn a_lost_lease_stops_the_run() {
    let s = site().await;
    let dir = tempfile::tempdir().unwrap();
    let stop = StopSignal::new();
    let host = FetchHost::new(host_settings(dir.path()), stop.clone())
        .unwrap()
        .with_sink(Arc::new(LosingSink));
    let program = Arc::new(
        parse("<config><loop item=\"i\"><list><template>a</template></list><body><http url=\"${base}/item/1.html\"/><sleep milliseconds=\"5000\"/></body></loop></config>")
            .unwrap(),
    );
    let params = [("base".to_string(), s.base.clone())].into_iter().collect();
    let started = Instant::now();
    let r = run_program(
        program,
        &params,
        Arc::new(host) as Arc<dyn Host>,
        Limits::default(),
        stop,
    )
    .await;
    assert_eq!(r.err().map(|e| e.kind), Some(RunErrorKind::LeaseLost));
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn the_deepest_evaluation_fits_the_interpreter_stack() {
    // Each call nests the next one 20 processors deep: the evaluation depth cap is reached
    // before the call depth cap, in a debug build, without overflowing the thread's stack.
    let nest = 18;
    let xml = format!(
        "<config><function name=\"deep\"><return>{}<call name=\"deep\"/>{}</return></function>\
         <call name=\"deep\"/></config>",
        "<empty>".repeat(nest),
        "</empty>".repeat(nest)
    );
    let s = site().await;
    let limits = Limits {
        max_call_depth: 10_000,
        ..Limits::default()
    };
    let r = run_in(&s, &xml, &[], limits, StopSignal::new()).await;
    let e = r.err();
    assert_eq!(e.kind, RunErrorKind::Limit("eval_depth"), "{}", e.message);
}

#[tokio::test]
async fn xpath_input_is_capped() {
    let s = site().await;
    let limits = Limits {
        max_html_xml_bytes: 100,
        ..Limits::default()
    };
    let xml = format!(
        "<config><xpath expression=\"//a\"><template>&lt;a&gt;{}&lt;/a&gt;</template></xpath></config>",
        "x".repeat(200)
    );
    let r = run_in(&s, &xml, &[], limits, StopSignal::new()).await;
    assert_eq!(r.err().kind, RunErrorKind::Limit("xpath_input_size"));
}
