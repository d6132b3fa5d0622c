//! Table tests of the source policy's decisions.

use super::*;

fn ctx(loopback: bool) -> Context {
    Context {
        loopback,
        endpoints: vec![
            Context::endpoint("https://huggingface.co").unwrap(),
            Context::endpoint("http://10.0.0.5:9000").unwrap(),
        ],
        data_dir: Some("/var/lib/flotilla-agent".into()),
    }
}

fn policy(yaml: &str) -> Policy {
    Policy::new(&PolicyFile::parse(yaml).unwrap(), &ctx(false)).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

fn rule_of(p: &Policy, source: &str) -> Option<Rule> {
    p.check(source).err().map(|r| r.rule)
}

const STRICT: &str = "
schemes: [https, hf, s3, file]
hosts: [models.example.com, '*.hf.co', 192.0.2.10]
paths:
  file: [/models]
  s3: [ml-models/llama]
  https: [/approved/]
  hf: [my-org]
";

#[test]
fn sources_are_checked_against_schemes_hosts_and_paths() {
    let p = policy(STRICT);
    for (source, want) in [
        ("file:///models/llama", None),
        ("file:///models", None),
        ("file:///models/../etc/shadow", Some(Rule::Traversal)),
        ("file:///models2/x", Some(Rule::Paths)),
        ("file:///etc/passwd", Some(Rule::Paths)),
        ("file:///var/lib/flotilla-agent/models/abc", Some(Rule::AgentData)),
        ("https://models.example.com/approved/m.bin#sha256=00", None),
        ("https://MODELS.example.com./approved/m.bin", None),
        ("https://models.example.com/other/m.bin", Some(Rule::Paths)),
        ("https://models.example.com/approved/../other/m.bin", Some(Rule::Traversal)),
        ("https://models.example.com/approved/%2e%2e/other", Some(Rule::Traversal)),
        ("https://models.example.com/approved%2F..%2Fother", Some(Rule::Traversal)),
        ("https://evil.example/approved/m.bin", Some(Rule::Hosts)),
        ("https://models.example.com.evil.example/approved/m", Some(Rule::Hosts)),
        ("https://models.example.com@evil.example/approved/m", Some(Rule::Userinfo)),
        ("https://cdn.hf.co/approved/x", None),
        ("https://a.b.hf.co/approved/x", None),
        ("https://hf.co/approved/x", Some(Rule::Hosts)),
        ("https://evilhf.co/approved/x", Some(Rule::Hosts)),
        ("https://192.0.2.10/approved/x", None),
        // The operator's endpoints count as allowed hosts.
        ("https://huggingface.co/approved/x", None),
        ("http://models.example.com/approved/m.bin", Some(Rule::Schemes)),
        ("ftp://models.example.com/approved/m.bin", Some(Rule::Schemes)),
        ("hf://my-org/model@main", None),
        ("hf://other-org/model", Some(Rule::Paths)),
        ("hf://my-org-evil/model", Some(Rule::Paths)),
        ("hf://my-org/../other/model", Some(Rule::Traversal)),
        ("s3://ml-models/llama/7b", None),
        ("s3://ml-models/llama2", Some(Rule::Paths)),
        ("s3://other/llama", Some(Rule::Paths)),
    ] {
        assert_eq!(rule_of(&p, source), want, "{source}");
    }
}

#[test]
fn defaults_are_secure_and_loopback_agents_may_use_http_and_loopback() {
    let remote = Policy::defaults(&ctx(false));
    let local = Policy::defaults(&ctx(true));
    assert_eq!(rule_of(&remote, "http://127.0.0.1:8000/m.bin"), Some(Rule::Schemes));
    assert_eq!(rule_of(&local, "http://127.0.0.1:8000/m.bin"), None);
    for p in [&remote, &local] {
        assert_eq!(rule_of(p, "https://anywhere.example/m.bin"), None);
        assert_eq!(rule_of(p, "file:///anywhere/m"), None);
        assert_eq!(rule_of(p, "hf://org/name"), None);
        assert_eq!(rule_of(p, "s3://bucket/x"), None);
        assert_eq!(rule_of(p, "file:///var/lib/flotilla-agent/agent-id"), Some(Rule::AgentData));
        assert_eq!(p.max_bytes(), 200 << 30);
    }
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let ten: IpAddr = "10.0.0.1".parse().unwrap();
    assert!(remote.check_addresses("http://x/", "x", &[lo]).is_err());
    assert!(local.check_addresses("http://x/", "x", &[lo]).is_ok());
    assert!(local.check_addresses("http://x/", "x", &[ten]).is_err(), "loopback mode allows loopback only");
    // A file's field replaces the default; fields it leaves out keep theirs.
    let p = Policy::new(&PolicyFile::parse("max_bytes: 1000").unwrap(), &ctx(true)).unwrap();
    assert_eq!(rule_of(&p, "http://127.0.0.1:8000/m.bin"), None);
    assert!(p.check_addresses("http://x/", "x", &[lo]).is_ok());
    let p = Policy::new(&PolicyFile::parse("private_networks: []").unwrap(), &ctx(true)).unwrap();
    assert!(p.check_addresses("http://x/", "x", &[lo]).is_err());
}

#[test]
fn every_resolved_address_must_be_allowed() {
    let p = policy("private_networks: [private]");
    let ips = |list: &[&str]| list.iter().map(|s| s.parse::<IpAddr>().unwrap()).collect::<Vec<_>>();
    for (addrs, ok) in [
        (ips(&["8.8.8.8"]), true),
        (ips(&["10.0.0.7"]), true),
        (ips(&["8.8.8.8", "127.0.0.1"]), false),
        (ips(&["169.254.169.254"]), false),
        (ips(&["::ffff:169.254.169.254"]), false),
        (ips(&["::ffff:10.1.1.1"]), true),
        (ips(&["fd00::1"]), false),
        (ips(&["fe80::1"]), false),
        (ips(&["0.0.0.0"]), false),
        (ips(&["::"]), false),
    ] {
        assert_eq!(p.check_addresses("https://m.example/x", "m.example", &addrs).is_ok(), ok, "{addrs:?}");
    }
    let r = p.check_addresses("https://m.example/x?sig=s", "m.example", &ips(&["169.254.169.254"])).unwrap_err();
    assert_eq!(r.rule, Rule::PrivateNetworks);
    let text = r.to_string();
    assert!(text.contains("rule private_networks") && text.contains("169.254.169.254"), "{text}");
    assert!(text.contains("link_local") && !text.contains("sig=s"), "{text}");
    let all = policy("private_networks: [loopback, private, link_local, unique_local]");
    assert!(all.check_addresses("u", "h", &ips(&["127.0.0.1", "fd00::1", "fe80::1", "169.254.1.1"])).is_ok());
    let r = all.check_addresses("u", "0.0.0.0", &ips(&["0.0.0.0"])).unwrap_err();
    assert!(r.detail.contains("which no policy allows"), "{}", r.detail);
}

#[test]
fn redirects_go_to_https_and_allowed_hosts_only() {
    let p = policy("hosts: [huggingface.co, '*.huggingface.co']");
    for (to, want) in [
        ("https://cdn-lfs.huggingface.co/repos/x?Signature=abc", None),
        ("http://cdn-lfs.huggingface.co/repos/x", Some(Rule::RedirectHttps)),
        ("https://evil.example/x", Some(Rule::Hosts)),
        ("file:///etc/passwd", Some(Rule::RedirectHttps)),
        ("https://user:pw@cdn-lfs.huggingface.co/x", Some(Rule::Userinfo)),
        ("gopher://x/", Some(Rule::Schemes)),
    ] {
        assert_eq!(p.check_redirect(to).err().map(|r| r.rule), want, "{to}");
    }
    // Within an operator's endpoint, any scheme (an http mirror redirecting to itself).
    assert!(p.check_redirect("http://10.0.0.5:9000/cache/x").is_ok());
    assert_eq!(p.check_redirect("http://10.0.0.5:9001/x").err().map(|r| r.rule), Some(Rule::RedirectHttps));
    // Path prefixes do not apply to redirect targets.
    let p = policy("paths: {https: [/approved]}");
    assert!(p.check_redirect("https://cdn.example/elsewhere").is_ok());
    // A redirect's addresses are checked like a source's.
    let t = p.check_redirect("https://internal.example/x").unwrap();
    assert!(p.needs_address_check(&t));
    let r = p.check_addresses("https://internal.example/x", "internal.example", &["10.0.0.1".parse().unwrap()]);
    assert_eq!(r.unwrap_err().rule, Rule::PrivateNetworks);
}

#[test]
fn operator_endpoints_skip_the_address_check() {
    let p = policy("hosts: []");
    let minio = url::parse("http://10.0.0.5:9000/bucket/x").unwrap();
    assert!(!p.needs_address_check(&minio));
    let other_port = url::parse("http://10.0.0.5:22/").unwrap();
    assert!(p.needs_address_check(&other_port));
    let hf = url::parse("https://huggingface.co/api/models/x").unwrap();
    assert!(!p.needs_address_check(&hf));
    assert_eq!(rule_of(&p, "https://other.example/x"), Some(Rule::Hosts));
    assert_eq!(rule_of(&p, "https://huggingface.co/x"), None);
}

#[test]
fn sizes_and_free_space() {
    let p = policy("max_bytes: 1000\nfree_space_margin: 1KiB");
    assert!(p.check_size("u", 1000).is_ok());
    let r = p.check_size("u", 1001).unwrap_err();
    assert_eq!(r.rule, Rule::MaxBytes);
    assert!(r.to_string().contains("1001 bytes is more than max_bytes 1000 bytes"), "{r}");
    assert!(p.check_space("u", 1000, 2024, Path::new("/d")).is_ok());
    let r = p.check_space("u", 1000, 2023, Path::new("/d")).unwrap_err();
    assert_eq!(r.rule, Rule::FreeSpace);
    assert!(r.to_string().contains("filesystem of /d has 2023 bytes"), "{r}");
    assert!(p.check_space("u", u64::MAX, u64::MAX, Path::new("/d")).is_err(), "no overflow");
    assert_eq!(parse_size("200GiB"), Ok(200 << 30));
    assert_eq!(parse_size("5 MB"), Ok(5_000_000));
    assert_eq!(parse_size("42"), Ok(42));
    assert!(parse_size("1.5GiB").is_err() && parse_size("GiB").is_err() && parse_size("9EiB").is_err());
    assert!(parse_size("99999999999PiB").is_err());
    assert_eq!(policy("max_bytes: '2GiB'").max_bytes(), 2 << 30);
}

#[test]
fn bad_files_are_refused_naming_the_field() {
    for (yaml, needle) in [
        ("hostz: [a]", "hostz"),
        ("schemes: [ftp]", "schemes: \"ftp\""),
        ("hosts: ['https://h']", "hosts: \"https://h\""),
        ("hosts: ['h:443']", "port"),
        ("hosts: ['a.*.com']", "first label"),
        ("hosts: ['bad host']", "not a host name"),
        ("paths: {ftp: [/x]}", "paths: \"ftp\""),
        ("paths: {file: [models]}", "absolute"),
        ("paths: {file: [/models/../etc]}", ".. segment"),
        ("private_networks: [public]", "private_networks: \"public\""),
        ("max_bytes: -1", "max_bytes"),
        ("max_bytes: 0", "max_bytes: must be positive"),
        ("max_bytes: 10 apples", "max_bytes"),
        ("free_space_margin: [1]", "free_space_margin"),
    ] {
        let e = PolicyFile::parse(yaml).and_then(|f| Policy::new(&f, &ctx(false)).map(|_| ())).unwrap_err();
        assert!(e.contains(needle), "{yaml}: {e}");
    }
    assert!(PolicyFile::parse("").is_ok() && PolicyFile::parse("# nothing\n").is_ok());
    let p = policy("hosts: ['[fd00::1]', 'fd00::2', '*.Example.COM']");
    assert_eq!(rule_of(&p, "https://[fd00::1]/x"), None);
    assert_eq!(rule_of(&p, "https://[fd00::2]:8443/x"), None);
    assert_eq!(rule_of(&p, "https://a.example.com/x"), None);
}

#[test]
fn refusals_name_their_rule_and_never_a_secret() {
    let p = policy(STRICT);
    let r = p.check("https://evil.example/approved/m?X-Amz-Signature=secret").unwrap_err();
    let text = r.to_string();
    assert!(text.starts_with("refused by the download source policy, rule hosts: https://evil.example"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    let r = p.check("https://user:hunter2@models.example.com/approved/m").unwrap_err();
    assert!(!r.to_string().contains("hunter2"), "{r}");
    let labels: BTreeSet<&str> = Rule::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), Rule::ALL.len(), "labels are distinct");
    for (i, r) in Rule::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
}
