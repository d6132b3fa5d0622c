//! docs/gateway.md's error list is the [`ApiCode`] table: this test renders it and fails
//! when the file differs. `UPDATE_DOCS=1 cargo test -p flotilla-gateway --test error_docs`
//! rewrites the table in place.

use flotilla_gateway::api_code::markdown_table;
use flotilla_gateway::ApiCode;

const BEGIN: &str = "<!-- api-codes:begin (generated from gateway/src/api_code.rs; UPDATE_DOCS=1 cargo test -p flotilla-gateway --test error_docs) -->\n";
const END: &str = "<!-- api-codes:end -->";

/// `doc` with the text between the markers replaced by `table`; None without the markers.
fn with_table(doc: &str, table: &str) -> Option<String> {
    let start = doc.find(BEGIN)? + BEGIN.len();
    let end = start + doc[start..].find(END)?;
    Some(format!("{}{table}{}", &doc[..start], &doc[end..]))
}

#[test]
fn with_table_replaces_only_the_text_between_the_markers() {
    let cases = [
        (format!("a\n{BEGIN}old\n{END}\nb"), Some(format!("a\n{BEGIN}new\n{END}\nb"))),
        (format!("a\n{BEGIN}{END}"), Some(format!("a\n{BEGIN}new\n{END}"))),
        ("no markers".to_string(), None),
        (format!("{END}{BEGIN}"), None),
    ];
    for (doc, want) in cases {
        assert_eq!(with_table(&doc, "new\n"), want, "{doc:?}");
    }
}

#[test]
fn the_gateway_docs_list_every_error_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/gateway.md");
    let doc = std::fs::read_to_string(&path).expect("docs/gateway.md");
    let want = with_table(&doc, &markdown_table(ApiCode::ALL))
        .unwrap_or_else(|| panic!("docs/gateway.md lacks the markers:\n{BEGIN}{END}"));
    if want == doc {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, want).expect("write docs/gateway.md");
        return;
    }
    panic!(
        "docs/gateway.md's error table differs from gateway/src/api_code.rs; \
         run `UPDATE_DOCS=1 cargo test -p flotilla-gateway --test error_docs` and commit the result"
    );
}
