//! One test (or a few) per processor, against the fixture pages.

use super::{run, run_in, site};
use crate::job::StopSignal;
use crate::webharvest::{Host, Limits, LogLevel};

#[tokio::test]
async fn var_def_var_and_empty() {
    let r = run(r#"
        <var-def name="a">hello</var-def>
        <var-def name="b"><var name="a"/></var-def>
        <var-def name="lines">one
            two</var-def>
        <var-def name="kept" overwrite="false">new</var-def>
        <var-def name="a" overwrite="false">ignored</var-def>
        <var-def name="nothing"><empty><var-def name="inner">x</var-def></empty></var-def>
    "#)
    .await;
    assert_eq!(r.text("a"), "hello");
    assert_eq!(r.text("b"), "hello");
    assert_eq!(
        r.list("lines"),
        ["one", "two"],
        "each text line is a constant"
    );
    assert_eq!(r.text("kept"), "new");
    assert_eq!(r.text("nothing"), "");
    assert_eq!(r.text("inner"), "x", "var-def inside empty still defines");
    assert!(r.text("base").starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn def_get_set_follow_web_harvest_2() {
    let r = run(r#"
        <def var="x" value="1"/>
        <def var="copy" value="${x}"/>
        <def var="fromBody"><template>b${x}</template></def>
        <def var="dflt" default="d"/>
        <def var="x2" value="${x}" default="unused"/>
        <set var="x" value="2"/>
        <loop item="i"><list><template>a</template></list><body>
            <set var="x" value="3"/>
            <def var="local" value="gone"/>
        </body></loop>
        <def var="got"><get var="x"/></def>
    "#)
    .await;
    assert_eq!(r.text("x"), "3", "set writes the existing outer variable");
    assert_eq!(r.text("copy"), "1");
    assert_eq!(r.text("fromBody"), "b1");
    assert_eq!(r.text("dflt"), "d");
    assert_eq!(r.text("x2"), "1");
    assert_eq!(r.text("got"), "3");
    assert!(
        !r.ok().variables.contains_key("local"),
        "def in a loop body stays there"
    );
}

#[tokio::test]
async fn text_and_template() {
    let r = run(r#"
        <var-def name="who">World</var-def>
        <var-def name="t"><template>Hello ${who}, ${1 + 1}!</template></var-def>
        <var-def name="joined"><text delimiter=", "><template>a</template><template>b</template></text></var-def>
        <var-def name="plain"><text><template>x</template><template>y</template></text></var-def>
        <var-def name="multi"><template>
            line one ${who}
            line two
        </template></var-def>
    "#)
    .await;
    assert_eq!(r.text("t"), "Hello World, 2!");
    assert_eq!(r.text("joined"), "a, b");
    assert_eq!(r.text("plain"), "x\ny");
    assert_eq!(r.text("multi"), "line one World\nline two");
}

#[tokio::test]
async fn http_get_with_params_headers_and_redirects() {
    let r = run(r#"
        <var-def name="page"><http url="${base}/shop.html"/></var-def>
        <var-def name="echo"><http url="${base}/echo?a=1">
            <http-param name="q">fruit &amp; veg</http-param>
            <http-param name="n"><template>${2 * 3}</template></http-param>
            <http-header name="X-Test">yes</http-header>
            <http-header name="User-Agent">Classic/1.0</http-header>
        </http></var-def>
        <var-def name="redirected"><http url="${base}/redirect"/></var-def>
        <var-def name="unfollowed"><http url="${base}/redirect" follow-redirects="false"/></var-def>
        <var-def name="missing"><http url="${base}/status/404"/></var-def>
        <var-def name="status"><template>${http.statusCode}</template></var-def>
        <var-def name="skipped"><http url="${base}/shop.html" ignore-response-body="true"/></var-def>
    "#)
    .await;
    assert!(r.text("page").contains("Cherry &amp; Co"));
    let echo = r.text("echo");
    assert!(
        echo.starts_with("GET /echo?a=1&q=fruit+%26+veg&n=6\n"),
        "{echo}"
    );
    assert!(echo.contains("x-test=yes"), "{echo}");
    assert!(echo.contains("user-agent=Classic/1.0"), "{echo}");
    assert!(r.text("redirected").contains("<h1>Item 1</h1>"));
    assert_eq!(r.text("unfollowed"), "");
    assert_eq!(
        r.text("missing"),
        "missing",
        "a 404 is an answer, as in Web-Harvest"
    );
    assert_eq!(r.text("status"), "404");
    assert_eq!(r.text("skipped"), "");
    let (pages, usage) = r.host.totals();
    assert_eq!(pages, 6);
    assert_eq!(usage.http_requests, 7, "one redirect followed");
    assert_eq!(usage.http_errors, 1);
}

#[tokio::test]
async fn http_post_forms_bodies_and_auth() {
    let r = run(r#"
        <var-def name="form"><http url="${base}/echo" method="post">
            <http-param name="name">Zoë</http-param><http-param name="x">1</http-param>
        </http></var-def>
        <var-def name="xml"><http url="${base}/echo" method="POST" content-type="text/xml">
            <template>&lt;a&gt;${1+1}&lt;/a&gt;</template>
        </http></var-def>
        <var-def name="latin"><http url="${base}/echo" method="post" charset="ISO-8859-1">
            <http-param name="name">Zoë</http-param>
        </http></var-def>
        <var-def name="multipart"><http url="${base}/echo" method="post" content-type="multipart/form-data">
            <http-param name="f" isfile="true" filename="a.txt" contenttype="text/plain">data</http-param>
        </http></var-def>
        <var-def name="auth"><http url="${base}/echo" username="u" password="p"/></var-def>
        <var-def name="seeother"><http url="${base}/post-redirect" method="post"><http-param name="a">1</http-param></http></var-def>
    "#)
    .await;
    let form = r.text("form");
    assert!(form.starts_with("POST /echo\n"), "{form}");
    assert!(form.ends_with("body=name=Zo%C3%AB&x=1"), "{form}");
    assert!(
        form.contains("content-type=application/x-www-form-urlencoded; charset=UTF-8"),
        "{form}"
    );
    assert!(
        r.text("xml").ends_with("body=<a>2</a>"),
        "{}",
        r.text("xml")
    );
    assert!(
        r.text("latin").ends_with("body=name=Zo%EB"),
        "{}",
        r.text("latin")
    );
    let mp = r.text("multipart");
    assert!(
        mp.contains("filename=\"a.txt\"") && mp.contains("data"),
        "{mp}"
    );
    assert!(r.text("auth").contains("authorization=Basic dTpw"));
    assert!(
        r.text("seeother").starts_with("GET /echo\n"),
        "a 303 continues as GET"
    );
}

#[tokio::test]
async fn http_keeps_cookies_within_the_session() {
    let r = run(r#"
        <var-def name="before"><http url="${base}/cookie/get"/></var-def>
        <empty><http url="${base}/cookie/set"/></empty>
        <var-def name="after"><http url="${base}/cookie/get"/></var-def>
    "#)
    .await;
    assert_eq!(r.text("before"), "none");
    assert_eq!(r.text("after"), "session=abc123");
}

#[tokio::test]
async fn http_decodes_by_meta_charset_and_the_http_object() {
    let r = run(r#"
        <var-def name="p"><xpath expression="//p/text()"><html-to-xml><http url="${base}/latin1.html"/></html-to-xml></xpath></var-def>
        <var-def name="cs"><template>${http.charset}/${http.mimeType}/${http.getHeader("content-type")}/${http.totalResponses}</template></var-def>
    "#)
    .await;
    assert_eq!(r.list("p"), ["Café"]);
    assert_eq!(r.text("cs"), "iso-8859-1/text/html/text/html/1");
}

#[tokio::test]
async fn html_to_xml_and_xpath() {
    let r = run(r#"
        <var-def name="doc"><html-to-xml><http url="${base}/shop.html"/></html-to-xml></var-def>
        <var-def name="names"><xpath expression="//li[@class='p']/a/text()"><var name="doc"/></xpath></var-def>
        <var-def name="hrefs"><xpath expression="//li/a/@href"><var name="doc"/></xpath></var-def>
        <var-def name="second"><xpath expression="//li[position()=2]/a"><var name="doc"/></xpath></var-def>
        <var-def name="count"><xpath expression="count(//li)"><var name="doc"/></xpath></var-def>
        <var-def name="note"><xpath expression="normalize-space(//p[@class='note'])"><var name="doc"/></xpath></var-def>
        <var-def name="cherry"><xpath expression="string(//li[contains(., 'Cherry')]/span)"><var name="doc"/></xpath></var-def>
    "#)
    .await;
    assert!(
        r.text("doc")
            .starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<html>")
    );
    assert_eq!(
        r.list("names"),
        ["Apple", "Banana", "Cherry & Co", "Apple again"]
    );
    assert_eq!(r.list("hrefs").len(), 4);
    assert_eq!(r.list("second"), ["<a href=\"/item/2.html\">Banana</a>"]);
    assert_eq!(r.list("count"), ["4"]);
    assert_eq!(r.list("note"), ["Prices include VAT"]);
    assert_eq!(r.list("cherry"), ["£3.00"]);
}

#[tokio::test]
async fn xpath_variables_of_the_2_1_namespace() {
    let s = site().await;
    let xml = r#"<config xmlns="http://web-harvest.sourceforge.net/schema/2.1/core"
                        xmlns:v="http://web-harvest.sourceforge.net/schema/2.1/var">
        <def var="firstName"><xpath expression="(//a)[1]/text()" v:prices="//span/text()">
            <html-to-xml><http url="${base}/shop.html"/></html-to-xml>
        </xpath></def>
        <def var="n" value="${prices.size()}"/>
    </config>"#;
    let r = run_in(&s, xml, &[], Limits::default(), StopSignal::new()).await;
    assert_eq!(r.list("firstName"), ["Apple"]);
    assert_eq!(r.text("n"), "4");
}

#[tokio::test]
async fn regexp_matches_groups_replace_and_max() {
    let r = run(r#"
        <var-def name="prices"><regexp>
            <regexp-pattern>£(\d+)\.(\d+)</regexp-pattern>
            <regexp-source><http url="${base}/shop.html"/></regexp-source>
            <regexp-result><template>${_1} pounds ${group2}</template></regexp-result>
        </regexp></var-def>
        <var-def name="whole"><regexp max="2">
            <regexp-pattern>SKU-\d</regexp-pattern>
            <regexp-source><template>SKU-1 SKU-2 SKU-3</template></regexp-source>
        </regexp></var-def>
        <var-def name="swapped"><regexp replace="true">
            <regexp-pattern>(\w+)@(\w+)</regexp-pattern>
            <regexp-source><template>joe@home, ann@work</template></regexp-source>
            <regexp-result><template>$2:$1</template></regexp-result>
        </regexp></var-def>
        <var-def name="ci"><regexp flag-caseinsensitive="true">
            <regexp-pattern>apple</regexp-pattern>
            <regexp-source><template>APPLE pie</template></regexp-source>
        </regexp></var-def>
    "#)
    .await;
    assert_eq!(
        r.list("prices"),
        ["1 pounds 50", "0 pounds 25", "3 pounds 00", "1 pounds 50"]
    );
    assert_eq!(r.list("whole"), ["SKU-1", "SKU-2"]);
    assert_eq!(r.list("swapped"), ["home:joe, work:ann"]);
    assert_eq!(r.list("ci"), ["APPLE"]);
    assert!(
        !r.ok().variables.contains_key("_1"),
        "group variables stay in the match"
    );
}

#[tokio::test]
async fn loop_item_index_filter_and_results() {
    let r = run(r#"
        <var-def name="doc"><html-to-xml><http url="${base}/shop.html"/></html-to-xml></var-def>
        <var-def name="numbered"><loop item="a" index="i">
            <list><xpath expression="//li/a/text()"><var name="doc"/></xpath></list>
            <body><template>${i}:${a}</template></body>
        </loop></var-def>
        <var-def name="unique"><loop item="h" filter="unique">
            <list><xpath expression="//li/a/@href"><var name="doc"/></xpath></list>
            <body><var name="h"/></body>
        </loop></var-def>
        <var-def name="odd"><loop item="h" filter="odd,unique" maxloops="1">
            <list><xpath expression="//li/a/text()"><var name="doc"/></xpath></list>
            <body><var name="h"/></body>
        </loop></var-def>
        <var-def name="titles"><loop item="h">
            <list><xpath expression="//li/a/@href"><var name="doc"/></xpath></list>
            <body><xpath expression="//h1/text()"><html-to-xml><http url="${sys.fullUrl(base, h)}"/></html-to-xml></xpath></body>
        </loop></var-def>
        <var-def name="quiet"><loop item="x" empty="true"><list><template>a</template></list><body><var name="x"/></body></loop></var-def>
    "#)
    .await;
    assert_eq!(
        r.list("numbered"),
        ["1:Apple", "2:Banana", "3:Cherry & Co", "4:Apple again"]
    );
    assert_eq!(
        r.list("unique"),
        ["/item/1.html", "/item/2.html", "/item/3.html"]
    );
    assert_eq!(r.list("odd"), ["Apple"]);
    assert_eq!(r.list("titles"), ["Item 1", "Item 2", "Item 3", "Item 1"]);
    assert_eq!(r.text("quiet"), "");
    assert!(
        !r.ok().variables.contains_key("a"),
        "item variables stay in the loop"
    );
}

#[tokio::test]
async fn while_with_index_and_var_def_updates() {
    let r = run(r#"
        <var-def name="url"><template>${base}/shop.html</template></var-def>
        <var-def name="pages"><while condition="${url.toString().length > 0}" index="i" maxloops="5">
            <empty>
                <var-def name="doc"><html-to-xml><http url="${url}"/></html-to-xml></var-def>
                <var-def name="next"><xpath expression="//a[@class='next']/@href"><var name="doc"/></xpath></var-def>
                <var-def name="url"><template>${next.isEmpty() ? "" : sys.fullUrl(base, next)}</template></var-def>
            </empty>
            <template>${i}</template>
        </while></var-def>
        <var-def name="capped"><while condition="true" maxloops="3"><template>x</template></while></var-def>
    "#)
    .await;
    assert_eq!(
        r.list("pages"),
        ["1", "2"],
        "var-def in the body updates the outer url"
    );
    assert_eq!(r.text("url"), "");
    assert_eq!(r.list("capped"), ["x", "x", "x"]);
}

#[tokio::test]
async fn case_if_else() {
    let r = run(r#"
        <var-def name="n">5</var-def>
        <var-def name="a"><case><if condition="${n > 3}">big</if><else>small</else></case></var-def>
        <var-def name="b"><case><if condition="${n > 9}">big</if><if condition="${n == 5}">five</if><else>small</else></case></var-def>
        <var-def name="c"><case><if condition="no">x</if></case></var-def>
        <case><if condition="yes"><var-def name="inside">set</var-def></if></case>
    "#)
    .await;
    assert_eq!(r.text("a"), "big");
    assert_eq!(r.text("b"), "five");
    assert_eq!(r.text("c"), "");
    assert_eq!(r.text("inside"), "set");
}

#[tokio::test]
async fn functions_call_params_and_return() {
    let r = run(r#"
        <function name="fetch-title">
            <return><xpath expression="//h1/text()"><html-to-xml><http url="${base}${path}"/></html-to-xml></xpath></return>
            <var-def name="leak">no</var-def>
        </function>
        <var-def name="title"><call name="fetch-title"><call-param name="path">/item/2.html</call-param></call></var-def>
        <var-def name="none"><call name="fetch-title"><call-param name="path">/nowhere</call-param></call></var-def>
    "#)
    .await;
    assert_eq!(r.list("title"), ["Item 2"]);
    assert_eq!(r.text("none"), "");
    assert!(!r.ok().variables.contains_key("leak"));
    assert!(!r.ok().variables.contains_key("path"));
}

#[tokio::test]
async fn recursion_through_call() {
    let r = run(r#"
        <function name="countdown">
            <return><case>
                <if condition="${n.toInt() &gt; 0}"><call name="countdown"><call-param name="n"><template>${n - 1}</template></call-param></call><template>${n}</template></if>
                <else>0</else>
            </case></return>
        </function>
        <var-def name="r"><call name="countdown"><call-param name="n">3</call-param></call></var-def>
    "#)
    .await;
    assert_eq!(r.list("r"), ["0", "1", "2", "3"]);
}

#[tokio::test]
async fn file_write_append_read_and_list() {
    let r = run(r#"
        <file action="write" path="out/items.txt"><template>a${sys.lf}</template></file>
        <file action="append" path="out/items.txt">b</file>
        <var-def name="read"><file path="out/items.txt"/></var-def>
        <file action="write" path="out/latin.txt" charset="ISO-8859-1">é</file>
        <var-def name="latin"><file path="out/latin.txt" charset="ISO-8859-1"/></var-def>
        <var-def name="listed"><file action="list" path="out" listfilter="*.txt"/></var-def>
    "#)
    .await;
    assert_eq!(r.text("read"), "a\nb");
    assert_eq!(r.text("latin"), "é");
    let on_disk = std::fs::read(r.dir.path().join("session/out/latin.txt")).unwrap();
    assert_eq!(on_disk, [0xe9]);
    assert_eq!(r.list("listed"), ["out/items.txt", "out/latin.txt"]);
}

#[tokio::test]
async fn json_to_xml_and_back() {
    let r = run(r#"
        <var-def name="names"><xpath expression="//items/name/text()">
            <json-to-xml tag="root"><http url="${base}/json"/></json-to-xml>
        </xpath></var-def>
        <var-def name="json"><xml-to-json><template>&lt;a id="1"&gt;&lt;b&gt;x&lt;/b&gt;&lt;b&gt;y&lt;/b&gt;&lt;/a&gt;</template></xml-to-json></var-def>
    "#)
    .await;
    assert_eq!(r.list("names"), ["Apple", "Banana"]);
    assert_eq!(r.text("json"), r#"{"a":{"id":1,"b":["x","y"]}}"#);
}

#[tokio::test]
async fn try_catch_sees_the_error() {
    let r = run(r#"
        <var-def name="r"><try>
            <body><var name="undefined_thing"/></body>
            <catch><template>caught: ${error}</template></catch>
        </try></var-def>
        <var-def name="ok"><try><body>fine</body><catch>no</catch></try></var-def>
    "#)
    .await;
    assert_eq!(
        r.text("r"),
        "caught: variable `undefined_thing` is not defined"
    );
    assert_eq!(r.text("ok"), "fine");
    let batch = r.host.take_batch();
    assert!(
        batch
            .log
            .iter()
            .any(|l| l.level == "warn" && l.message.contains("try caught"))
    );
}

#[tokio::test]
async fn exit_ends_the_run_successfully() {
    let r = run(r#"
        <var-def name="a">1</var-def>
        <exit condition="${a == 2}" message="not yet"/>
        <var-def name="b">2</var-def>
        <exit message="done early"/>
        <var-def name="c">3</var-def>
    "#)
    .await;
    assert_eq!(r.ok().exit_message.as_deref(), Some("done early"));
    assert_eq!(r.text("b"), "2");
    assert!(!r.ok().variables.contains_key("c"));
}

#[tokio::test]
async fn sleep_waits() {
    let started = std::time::Instant::now();
    let r = run(r#"<sleep milliseconds="150"/><var-def name="after">x</var-def>"#).await;
    assert_eq!(r.text("after"), "x");
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));
}

#[tokio::test]
async fn processors_are_counted_and_logged() {
    let r =
        run(r#"<var-def name="a"><template>x</template></var-def><script>print("hi", 1)</script>"#)
            .await;
    assert_eq!(r.ok().processors, 4, "config, var-def, template, script");
    r.host.log(LogLevel::Info, "end");
    let log = r.host.take_batch().log;
    assert!(log.iter().any(|l| l.message == "print: hi 1"), "{log:?}");
}
