//! `<script>`, `${…}` and Web-Harvest's script objects, and the sandbox's limits.

use std::time::Duration;

use super::{run, run_in, site};
use crate::job::StopSignal;
use crate::webharvest::{Limits, RunErrorKind};

#[tokio::test]
async fn scripts_keep_globals_and_see_variables_as_objects() {
    let r = run(r#"
        <var-def name="items"><template>a</template><template>b</template><template>c</template></var-def>
        <var-def name="n">41</var-def>
        <script><![CDATA[
            var seen = new Set();
            function twice(x) { return x + x; }
            total = items.size();
        ]]></script>
        <var-def name="sum"><template>${n + 1}</template></var-def>
        <var-def name="concat"><template>${"id-" + n}</template></var-def>
        <var-def name="size"><template>${total}/${items.toList().size()}/${items.isEmpty()}/${n.toInt() * 2}</template></var-def>
        <var-def name="first"><template>${items.toList().get(0)}</template></var-def>
        <var-def name="tw"><template>${twice("ab")}</template></var-def>
        <var-def name="arr"><script>["x", "y"]</script></var-def>
        <var-def name="same"><script>items</script></var-def>
        <var-def name="ret"><script return="answer">var answer = 6 * 7</script></var-def>
        <var-def name="bean"><script language="beanshell">"still " + "javascript"</script></var-def>
    "#)
    .await;
    assert_eq!(r.text("sum"), "42");
    assert_eq!(r.text("concat"), "id-41");
    assert_eq!(r.text("size"), "3/3/false/82");
    assert_eq!(r.text("first"), "a");
    assert_eq!(r.text("tw"), "abab");
    assert_eq!(r.list("arr"), ["x", "y"]);
    assert_eq!(
        r.list("same"),
        ["a", "b", "c"],
        "a variable returned keeps its list"
    );
    assert_eq!(r.text("ret"), "42");
    assert_eq!(r.text("bean"), "still javascript");
}

#[tokio::test]
async fn sys_object() {
    let r = run(r#"
        <var-def name="url"><template>${sys.fullUrl("http://a.b/x/y.html", "../z.html")}</template></var-def>
        <var-def name="esc"><template>${sys.escapeXml("a&lt;b &amp; 'c' &amp;amp;")}</template></var-def>
        <var-def name="year"><template>${sys.datetime("yyyy-MM-dd'T'HH")}</template></var-def>
        <var-def name="lf"><template>a${sys.lf}b</template></var-def>
        <var-def name="defined"><template>${sys.isVariableDefined("url")}/${sys.isVariableDefined("nope")}</template></var-def>
        <script>sys.defineVariable("made", "by script"); sys.defineVariable("made", "again", false);</script>
        <var-def name="got"><template>${sys.getVar("made")}</template></var-def>
        <var-def name="file"><template>${sys.getFilename("a/b/c.txt")}</template></var-def>
    "#)
    .await;
    assert_eq!(r.text("url"), "http://a.b/z.html");
    assert_eq!(r.text("esc"), "a&lt;b &amp; &apos;c&apos; &amp;");
    let y = r.text("year");
    assert!(
        regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}$")
            .unwrap()
            .is_match(&y),
        "{y}"
    );
    assert_eq!(r.text("lf"), "a\nb");
    assert_eq!(r.text("defined"), "true/false");
    assert_eq!(r.text("made"), "by script");
    assert_eq!(r.text("got"), "by script");
    assert_eq!(r.text("file"), "c.txt");
}

#[tokio::test]
async fn set_context_var_writes_the_session_variable_from_a_loop() {
    let r = run(r#"
        <var-def name="count">0</var-def>
        <loop item="x"><list><template>a</template><template>b</template></list><body>
            <script>SetContextVar("count", count + 1); SetContextVar("last", x.toString());</script>
        </body></loop>
    "#)
    .await;
    assert_eq!(r.text("count"), "2");
    assert!(
        !r.ok().variables.contains_key("last"),
        "a new name set from a loop body stays in it"
    );
}

#[tokio::test]
async fn scripts_have_no_file_or_network_access() {
    let r = run(r#"
        <var-def name="caps"><script>[typeof require, typeof fetch, typeof std, typeof os, typeof XMLHttpRequest, typeof process].join(",")</script></var-def>
        <var-def name="imp"><try><body><script>import("os")</script></body><catch>refused</catch></try></var-def>
    "#)
    .await;
    assert_eq!(
        r.text("caps"),
        "undefined,undefined,undefined,undefined,undefined,undefined"
    );
    assert_eq!(r.text("imp"), "refused");
}

#[tokio::test]
async fn a_script_error_names_the_processor_and_try_catches_it() {
    let r = run(r#"<var-def name="x"><script>sys.error("bad input")</script></var-def>"#).await;
    let e = r.err();
    assert_eq!(e.kind, RunErrorKind::Failed);
    assert!(
        e.message
            .starts_with("config/var-def/script: script: Error: bad input"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("(script line 1) (line 1, column 27)"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_runaway_script_hits_its_time_limit() {
    let s = site().await;
    let limits = Limits {
        script_time: Duration::from_millis(200),
        ..Limits::default()
    };
    let started = std::time::Instant::now();
    let r = run_in(
        &s,
        "<config><try><body><script>while (true) {}</script></body><catch>caught</catch></try></config>",
        &[],
        limits,
        StopSignal::new(),
    )
    .await;
    let e = r.err();
    assert_eq!(e.kind, RunErrorKind::Limit("script_time"), "not catchable");
    assert!(e.message.contains("time limit (200 ms)"), "{}", e.message);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_greedy_script_hits_its_memory_limit() {
    let s = site().await;
    let limits = Limits {
        script_memory_bytes: 8 << 20,
        ..Limits::default()
    };
    let r = run_in(
        &s,
        "<config><script>var a = []; while (true) { a.push('x'.repeat(1000) + a.length); }</script></config>",
        &[],
        limits,
        StopSignal::new(),
    )
    .await;
    let e = r.err();
    assert_eq!(
        e.kind,
        RunErrorKind::Limit("script_memory"),
        "{}",
        e.message
    );
    assert!(e.message.starts_with("config/script: "), "{}", e.message);
}
