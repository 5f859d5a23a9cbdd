//! The routing case table: scenarios (a set of routing resources) with request → expected cases.
//! Services and namespaces are those of `tests::world` (`demo` uses the waypoint `demo/waypoint`).

/// One set of resources and the requests checked against it.
pub(crate) struct Scenario {
    pub name: &'static str,
    /// Multi-document YAML: VirtualService, DestinationRule, HTTPRoute.
    pub yaml: &'static str,
    /// Expected configuration errors: (`Kind ns/name`, field).
    pub errors: Vec<(&'static str, &'static str)>,
    pub cases: Vec<Case>,
}

/// One request. `service` is `name` (namespace `demo`) or `ns/name`; `port` 0 = the service's
/// first port; `authority` defaults to the service name; `roll` is the weighted-pick roll.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub service: &'static str,
    pub port: u16,
    pub method: &'static str,
    pub scheme: &'static str,
    pub authority: Option<&'static str>,
    pub path: &'static str,
    pub headers: Vec<(&'static str, &'static str)>,
    pub source_namespace: Option<&'static str>,
    pub source_labels: Vec<(&'static str, &'static str)>,
    pub roll: u64,
    pub expect: Expect,
}

/// What must come out. `backend` (`name` or `ns/name`) with `subset` when forwarded (status 200 as
/// the test upstream answers); otherwise `status` (+ `location`). Header expectations: all values
/// joined with `,`, `None` = absent. The simulated upstream answers with `x-upstream: u`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Expect {
    pub status: u16,
    pub backend: Option<&'static str>,
    pub subset: Option<&'static str>,
    pub backend_port: Option<u16>,
    pub location: Option<&'static str>,
    pub path: Option<&'static str>,
    pub authority: Option<&'static str>,
    pub request_headers: Vec<(&'static str, Option<&'static str>)>,
    pub response_headers: Vec<(&'static str, Option<&'static str>)>,
}

pub(crate) fn req(service: &'static str, path: &'static str) -> Case {
    Case {
        service,
        port: 0,
        method: "GET",
        scheme: "http",
        authority: None,
        path,
        headers: Vec::new(),
        source_namespace: None,
        source_labels: Vec::new(),
        roll: 0,
        expect: Expect::default(),
    }
}

impl Case {
    pub fn method(mut self, m: &'static str) -> Self {
        self.method = m;
        self
    }
    pub fn h(mut self, k: &'static str, v: &'static str) -> Self {
        self.headers.push((k, v));
        self
    }
    pub fn auth(mut self, a: &'static str) -> Self {
        self.authority = Some(a);
        self
    }
    pub fn scheme(mut self, s: &'static str) -> Self {
        self.scheme = s;
        self
    }
    pub fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    pub fn src_ns(mut self, ns: &'static str) -> Self {
        self.source_namespace = Some(ns);
        self
    }
    pub fn labels(mut self, l: &[(&'static str, &'static str)]) -> Self {
        self.source_labels = l.to_vec();
        self
    }
    pub fn roll(mut self, r: u64) -> Self {
        self.roll = r;
        self
    }
    /// Forwarded to `service` (no subset unless `.subset()`).
    pub fn to(mut self, service: &'static str) -> Self {
        self.expect.backend = Some(service);
        self.expect.status = 200;
        self
    }
    pub fn subset(mut self, s: &'static str) -> Self {
        self.expect.subset = Some(s);
        self
    }
    pub fn bport(mut self, p: u16) -> Self {
        self.expect.backend_port = Some(p);
        self
    }
    pub fn status(mut self, code: u16) -> Self {
        self.expect.status = code;
        self
    }
    pub fn location(mut self, l: &'static str) -> Self {
        self.expect.location = Some(l);
        self
    }
    pub fn upath(mut self, p: &'static str) -> Self {
        self.expect.path = Some(p);
        self
    }
    pub fn uauth(mut self, a: &'static str) -> Self {
        self.expect.authority = Some(a);
        self
    }
    pub fn req_h(mut self, k: &'static str, v: Option<&'static str>) -> Self {
        self.expect.request_headers.push((k, v));
        self
    }
    pub fn resp_h(mut self, k: &'static str, v: Option<&'static str>) -> Self {
        self.expect.response_headers.push((k, v));
        self
    }
}

/// Rolls at a given percentage of the u64 range.
fn at(percent: u64) -> u64 {
    (u64::MAX / 100) * percent
}

pub(crate) const BOOKINFO: &str = include_str!("bookinfo.yaml");
pub(crate) const MATCHES: &str = include_str!("matches.yaml");
pub(crate) const ACTIONS: &str = include_str!("actions.yaml");
pub(crate) const GATEWAY: &str = include_str!("gateway.yaml");
pub(crate) const PARENTS: &str = include_str!("parents.yaml");
pub(crate) const HOSTS: &str = include_str!("hosts.yaml");
pub(crate) const BAD: &str = include_str!("bad.yaml");

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![bookinfo(), matches(), actions(), gateway(), parents(), hosts(), bad()]
}

fn bookinfo() -> Scenario {
    Scenario {
        name: "bookinfo",
        yaml: BOOKINFO,
        errors: vec![],
        cases: vec![
            req("reviews", "/reviews/1").h("end-user", "jason").to("reviews").subset("v2"),
            req("reviews", "/reviews/1").to("reviews").subset("v1"),
            req("reviews", "/reviews/1").h("end-user", "Jason").to("reviews").subset("v1"),
            req("reviews", "/reviews/1").h("end-user", "jasonx").to("reviews").subset("v1"),
            req("reviews", "/").h("end-user", "jason").method("POST").to("reviews").subset("v2"),
            req("reviews", "/any/path?x=1").h("End-User", "jason").to("reviews").subset("v2").bport(9080),
            req("reviews", "/").h("end-user", "jason").h("end-user", "bob").to("reviews").subset("v1"),
            req("ratings", "/ratings/0").roll(0).to("ratings").subset("v1"),
            req("ratings", "/ratings/0").roll(u64::MAX).to("ratings").subset("v2"),
            req("ratings", "/ratings/0").roll(at(79)).to("ratings").subset("v1"),
            req("ratings", "/ratings/0").roll(at(81)).to("ratings").subset("v2"),
            req("productpage", "/productpage")
                .h("user-agent", "Mozilla/5.0 (Macintosh) AppleWebKit Safari/605.1.15")
                .to("productpage")
                .subset("v1"),
            req("productpage", "/productpage").h("user-agent", "Mozilla/5.0 Chrome/120").to("productpage").subset("v2"),
            req("productpage", "/productpage").to("productpage").subset("v2"),
            req("productpage", "/").h("user-agent", "Safari").to("productpage").subset("v1"),
            req("productpage", "/").h("user-agent", "safari").to("productpage").subset("v2"),
            req("details", "/details/1").to("details").upath("/details/1").bport(9080),
            req("details", "/a?b=c").method("DELETE").to("details").upath("/a?b=c"),
            req("details", "/").to("details").resp_h("x-upstream", Some("u")).req_h("end-user", None),
            req("other/foo", "/").status(404),
            req("optout", "/").status(404),
            req("demo/nonexistent", "/").status(404),
        ],
    }
}

fn matches() -> Scenario {
    let w = |path| req("web", path);
    Scenario {
        name: "matches",
        yaml: MATCHES,
        errors: vec![],
        cases: vec![
            // uri exact
            w("/exact").to("web").subset("exact"),
            w("/exact?x=1").to("web").subset("exact"),
            w("/exact/").to("web").subset("catchall"),
            w("/exactly").to("web").subset("catchall"),
            w("/Exact").to("web").subset("catchall"),
            // uri prefix (plain string prefix, as Envoy)
            w("/prefix").to("web").subset("prefix"),
            w("/prefix/a/b").to("web").subset("prefix"),
            w("/prefixed").to("web").subset("prefix"),
            w("/pre").to("web").subset("catchall"),
            w("/PREFIX").to("web").subset("catchall"),
            // uri regex: full match of the path without query
            w("/items/42").to("web").subset("regex"),
            w("/items/42?x=y").to("web").subset("regex"),
            w("/items/42/extra").to("web").subset("catchall"),
            w("/items/").to("web").subset("catchall"),
            w("/items/abc").to("web").subset("catchall"),
            w("/x/items/42").to("web").subset("catchall"),
            // ignoreUriCase: exact and prefix fold case, regex does not
            w("/caseless").to("web").subset("ci"),
            w("/CASELESS").to("web").subset("ci"),
            w("/CaseLess").to("web").subset("ci"),
            w("/caseless/x").to("web").subset("catchall"),
            w("/ci-prefix/x").to("web").subset("ci"),
            w("/CI-PREFIX/y").to("web").subset("ci"),
            w("/ReGex").to("web").subset("ci"),
            w("/regex").to("web").subset("catchall"),
            // method
            w("/m").method("DELETE").to("web").subset("method"),
            w("/m").method("PUT").to("web").subset("method"),
            w("/m").method("PATCH").to("web").subset("method"),
            w("/m").method("POST").to("web").subset("catchall"),
            w("/m").method("PUTS").to("web").subset("catchall"),
            // first rule wins
            w("/exact").method("DELETE").to("web").subset("exact"),
            // authority
            w("/").auth("web.example.com").to("web").subset("auth"),
            w("/").auth("admin.web").to("web").subset("auth"),
            w("/").auth("web.example.com:80").to("web").subset("catchall"),
            w("/").auth("web").to("web").subset("catchall"),
            // scheme
            w("/").scheme("https").to("web").subset("scheme"),
            w("/").scheme("http").to("web").subset("catchall"),
            // header presence / prefix / regex
            w("/").h("x-present", "anything").to("web").subset("present"),
            w("/").h("X-Present", "").to("web").subset("present"),
            w("/").h("x-prefix", "abcdef").to("web").subset("hprefix"),
            w("/").h("x-prefix", "abc").to("web").subset("hprefix"),
            w("/").h("x-prefix", "xabc").to("web").subset("catchall"),
            w("/").h("x-re", "v1").to("web").subset("hregex"),
            w("/").h("x-re", "v10").to("web").subset("catchall"),
            w("/").h("x-re", "xv1").to("web").subset("catchall"),
            // fields within a match are ANDed
            w("/and").h("x-one", "1").h("x-two", "2").to("web").subset("and"),
            w("/and").h("x-one", "1").to("web").subset("catchall"),
            w("/and").h("x-two", "2").to("web").subset("catchall"),
            w("/other").h("x-one", "1").h("x-two", "2").to("web").subset("catchall"),
            // matches within a rule are ORed
            w("/").h("x-or-a", "a").to("web").subset("or"),
            w("/").h("x-or-b", "b").to("web").subset("or"),
            w("/").h("x-or-a", "b").to("web").subset("catchall"),
            // several values are joined with "," before matching
            w("/").h("x-or-a", "a").h("x-or-a", "a").to("web").subset("catchall"),
            // withoutHeaders
            w("/guarded").to("web").subset("without"),
            w("/guarded").h("x-block", "yes").to("web").subset("catchall"),
            w("/tier").to("web").subset("without"),
            w("/tier").h("x-tier", "silver").to("web").subset("without"),
            w("/tier").h("x-tier", "gold").to("web").subset("catchall"),
            // queryParams
            w("/q?q=1").to("web").subset("query"),
            w("/q?q=2").to("web").subset("catchall"),
            w("/q?a=0&q=1").to("web").subset("query"),
            w("/q?r=abc").to("web").subset("query"),
            w("/q?r=ABC").to("web").subset("catchall"),
            w("/q?r=").to("web").subset("catchall"),
            w("/q").to("web").subset("catchall"),
            w("/q?qq=1").to("web").subset("catchall"),
            // port
            w("/").port(8080).to("web").subset("port").bport(8080),
            w("/").port(80).to("web").subset("catchall").bport(80),
            // source namespace and labels
            w("/").src_ns("trusted").to("web").subset("srcns"),
            w("/").src_ns("untrusted").to("web").subset("catchall"),
            w("/").to("web").subset("catchall"),
            w("/")
                .src_ns("x")
                .labels(&[("app", "frontend"), ("version", "v1"), ("extra", "1")])
                .to("web")
                .subset("srclabels"),
            w("/").src_ns("x").labels(&[("app", "frontend")]).to("web").subset("catchall"),
            w("/").src_ns("x").labels(&[("app", "frontend"), ("version", "v2")]).to("web").subset("catchall"),
        ],
    }
}

fn actions() -> Scenario {
    let a = |path| req("api", path);
    Scenario {
        name: "actions",
        yaml: ACTIONS,
        errors: vec![],
        cases: vec![
            // redirects (Istio: 301 by default, the whole path replaced, query kept)
            a("/r1").status(301).location("http://api/moved"),
            a("/r1/sub?x=1").status(301).location("http://api/moved?x=1"),
            a("/r1").auth("api:9999").status(301).location("http://api:9999/moved"),
            a("/r1").auth("api:80").status(301).location("http://api/moved"),
            a("/r2/path").status(301).location("https://secure.example/r2/path"),
            a("/r2").auth("api:8080").status(301).location("https://secure.example/r2"),
            a("/r3").status(301).location("https://api:8443/r3"),
            a("/r4").status(308).location("http://api/r4new"),
            a("/r4/x").status(404),
            a("/r5").status(301).location("http://other.example:8080/r5"),
            a("/r6").auth("api:80").status(301).location("https://api/r6"),
            a("/r6").auth("api:8080").status(301).location("https://api:8080/r6"),
            a("/r7").auth("api:8080").status(301).location("http://api:8080/r7"),
            a("/r8").auth("api:8080").status(301).location("http://elsewhere.example:8080/r8"),
            a("/r8").auth("api").status(301).location("http://elsewhere.example/r8"),
            a("/r9").auth("api:8080").status(301).location("http://elsewhere.example/r9"),
            // direct response
            a("/direct").status(418),
            a("/direct/more").method("POST").status(418),
            // rewrites
            a("/rw-prefix/x").to("details").upath("/v2/x"),
            a("/rw-prefix").to("details").upath("/v2"),
            a("/rw-prefix?q=1").to("details").upath("/v2?q=1"),
            a("/rw-exact").to("details").upath("/replaced"),
            a("/rw-exact?z=9").to("details").upath("/replaced?z=9"),
            a("/rw-re/a/b/c").to("details").upath("/b/c/a"),
            a("/rw-re/a/b?k=v").to("details").upath("/b/a?k=v"),
            a("/rw-auth/x").to("details").uauth("internal.example").upath("/rw-auth/x"),
            a("/rw-both/x").to("details").uauth("both.example").upath("/x"),
            // header operations: route and destination level, request and response
            a("/hdrs")
                .h("x-remove", "gone")
                .h("x-add", "orig")
                .h("x-set", "old")
                .to("details")
                .req_h("x-set", Some("1"))
                .req_h("x-add", Some("orig,a"))
                .req_h("x-remove", None)
                .req_h("x-dest", Some("d"))
                .resp_h("x-resp", Some("r"))
                .resp_h("x-resp-add", Some("ra"))
                .resp_h("x-dest-resp", Some("dr"))
                .resp_h("x-upstream", None),
            a("/hdrs").to("details").req_h("x-add", Some("a")).req_h("x-set", Some("1")),
            // fault abort at 100% and 0%
            a("/fault").status(503),
            a("/fault/x").method("POST").status(503),
            a("/nofault").to("details"),
            // CORS
            a("/cors")
                .method("OPTIONS")
                .h("origin", "https://ok.example")
                .h("access-control-request-method", "POST")
                .status(200)
                .resp_h("access-control-allow-origin", Some("https://ok.example"))
                .resp_h("access-control-allow-methods", Some("GET,POST"))
                .resp_h("access-control-allow-headers", Some("x-custom"))
                .resp_h("access-control-max-age", Some("60"))
                .resp_h("access-control-allow-credentials", Some("true")),
            a("/cors")
                .method("OPTIONS")
                .h("origin", "https://app.trusted.example")
                .h("access-control-request-method", "GET")
                .status(200)
                .resp_h("access-control-allow-origin", Some("https://app.trusted.example")),
            a("/cors")
                .method("OPTIONS")
                .h("origin", "https://evil.example")
                .h("access-control-request-method", "GET")
                .to("details")
                .resp_h("access-control-allow-origin", None),
            a("/cors")
                .h("origin", "https://ok.example")
                .to("details")
                .resp_h("access-control-allow-origin", Some("https://ok.example"))
                .resp_h("access-control-expose-headers", Some("x-exposed"))
                .resp_h("access-control-allow-credentials", Some("true")),
            a("/cors").h("origin", "https://evil.example").to("details").resp_h("access-control-allow-origin", None),
            a("/cors").to("details").resp_h("access-control-allow-origin", None),
            a("/cors").method("OPTIONS").to("details"),
            // destination port, other namespace
            a("/port").to("echo").bport(8080),
            a("/other-ns").to("other/foo").bport(80),
            a("/timeouts").to("details"),
            a("/noretry").to("details"),
            // no catch-all: 404
            a("/nothing").status(404),
            a("/").status(404),
        ],
    }
}

fn gateway() -> Scenario {
    let e = |path| req("echo", path);
    let g = |path| req("gw1", path);
    Scenario {
        name: "gateway",
        yaml: GATEWAY,
        errors: vec![("HTTPRoute demo/gw1-filters", "spec.rules[12].backendRefs[0].name")],
        cases: vec![
            // path precedence: Exact > longest PathPrefix; PathPrefix is element-wise
            e("/foo/x").to("b1"),
            e("/foo").to("b1"),
            e("/foo/").to("b1"),
            e("/foobar").status(404),
            e("/foo/exact").to("b2"),
            e("/foo/exact/more").to("b1"),
            e("/foo/exact?x=1").to("b2"),
            e("/foo/bar/baz").to("b3"),
            e("/foo/bar").to("b3"),
            e("/foo/barn").to("b1"),
            // then method, then most headers, then most query params
            e("/foo/x").method("POST").to("b4"),
            e("/foo/bar").method("POST").to("b3"),
            e("/foo/x").h("x-a", "1").h("x-b", "2").to("b5"),
            e("/foo/x").h("x-a", "1").to("b6"),
            e("/foo/x").h("X-A", "1").to("b6"),
            e("/foo/x").h("x-a", "2").to("b1"),
            e("/foo/x").method("POST").h("x-a", "1").h("x-b", "2").to("b4"),
            e("/foo?v=2").to("details"),
            e("/foo?v=3").to("b1"),
            e("/foo?v=2").h("x-a", "1").to("b6"),
            // regular expressions: full match
            e("/re/123").to("reviews"),
            e("/re/12a").status(404),
            e("/re/123/x").status(404),
            e("/anything").h("x-env", "staging").to("ratings"),
            e("/anything").h("X-Env", "stage").to("ratings"),
            e("/anything").h("x-env", "stag").status(404),
            e("/foo/x").h("x-env", "staging").to("b1"),
            // ties: the oldest route, then namespace/name
            e("/tie/x").to("b2"),
            e("/name-tie").to("b5"),
            // an HTTPRoute replaces the VirtualService (which would send everything to b6)
            e("/nothing").status(404),
            req("gw2", "/anything").to("b6"),
            // filters
            g("/hdr")
                .h("x-remove", "x")
                .h("x-add", "orig")
                .to("b1")
                .req_h("x-set", Some("s"))
                .req_h("x-add", Some("orig,a"))
                .req_h("x-remove", None)
                .req_h("x-backend", Some("b1"))
                .resp_h("x-resp", Some("r"))
                .resp_h("x-upstream", None),
            g("/redir/x").status(302).location("https://gw1/redir/x"),
            g("/redir/x").auth("gw1:8080").status(302).location("https://gw1/redir/x"),
            g("/host/a").auth("gw1:8080").status(302).location("http://moved.example:8080/host/a"),
            g("/host/a").status(302).location("http://moved.example/host/a"),
            g("/redir301/a").status(301).location("http://new.example:8080/redir301/a"),
            g("/old/page?x=1").status(302).location("http://gw1/new/page?x=1"),
            g("/old").status(302).location("http://gw1/new"),
            g("/old").auth("gw1:8080").status(302).location("http://gw1:8080/new"),
            g("/full/a").status(302).location("http://gw1/elsewhere"),
            g("/api/v1/users").to("b2").upath("/v2/users"),
            g("/api/v1").to("b2").upath("/v2"),
            g("/api/v1/").to("b2").upath("/v2/"),
            g("/api/v10").status(404),
            g("/strip/a/b").to("b2").upath("/a/b"),
            g("/strip").to("b2").upath("/"),
            g("/whole/x?q").to("b2").upath("/fixed?q").uauth("rewritten.example"),
            g("/mirror").to("b2"),
            // weights: 0 is never picked
            g("/weights").roll(0).to("b2"),
            g("/weights").roll(at(50)).to("b2"),
            g("/weights").roll(u64::MAX).to("b2"),
            g("/split").roll(0).to("b1").bport(80),
            g("/split").roll(u64::MAX).to("b3"),
            g("/split").roll(at(40)).to("b1"),
            g("/split").roll(at(60)).to("b3"),
            // no usable backend: 500
            g("/zero").status(500),
            g("/nobackend").status(500),
            g("/missing").status(500),
            g("/timeout").to("b4"),
            g("/unmatched").status(404),
        ],
    }
}

fn parents() -> Scenario {
    Scenario {
        name: "parents",
        yaml: PARENTS,
        errors: vec![],
        cases: vec![
            req("b1", "/gw").to("details"),
            req("b1", "/gw/x").to("details"),
            req("b2", "/gw").to("details"),
            req("b1", "/other").status(404),
            req("b3", "/gw").to("b3"),
            req("b4", "/x").to("b4"),
            req("echo", "/").port(8080).to("b3"),
            req("gw2", "/any").to("b6"),
            req("gw1", "/any").to("gw1"),
            // a GAMMA consumer route: only for clients in its namespace, before the service's own routes
            req("b5", "/c").src_ns("other").to("b6"),
            req("b5", "/c/x").src_ns("other").to("b6"),
            req("b5", "/d").src_ns("other").to("b5"),
            req("b5", "/c").src_ns("demo").to("b5"),
            req("b5", "/c").to("b5"),
        ],
    }
}

fn hosts() -> Scenario {
    Scenario {
        name: "hosts",
        yaml: HOSTS,
        errors: vec![],
        cases: vec![
            req("b1", "/").to("b2"),
            req("b2", "/").to("details"),
            req("b3", "/").to("b4"),
            req("b5", "/").to("details"),
            req("b6", "/").to("reviews"),
            req("reviews", "/").to("details"),
            req("gw1", "/").to("ratings"),
            req("other/foo", "/").status(404),
        ],
    }
}

fn bad() -> Scenario {
    let vs = "VirtualService demo/bad-rules";
    Scenario {
        name: "bad input",
        yaml: BAD,
        errors: vec![
            (vs, "spec.http[0].match[0].headers.x-bad.regex"),
            (vs, "spec.http[1].route[0].weight"),
            (vs, "spec.http[2].route[0].destination.subset"),
            (vs, "spec.http[3].route[0].destination.host"),
            (vs, "spec.http[4].route"),
            (vs, "spec.http[5].retries.retryOn"),
            (vs, "spec.http[6].timeout"),
            ("HTTPRoute demo/bad-re", "spec.rules[0].matches[0].path.value"),
        ],
        cases: vec![
            req("b1", "/").h("x-bad", "x").to("b5"),
            req("b1", "/neg").to("b5"),
            req("b1", "/subset").to("b5"),
            req("b1", "/missing").to("b5"),
            req("b1", "/zero").to("b5"),
            req("b1", "/retry").to("b5"),
            req("b1", "/timeout").to("b5"),
            req("b1", "/good").to("b4"),
            req("b2", "/ok").to("b6"),
            req("b2", "/x").status(404),
            req("b3", "/").to("b3"),
        ],
    }
}
