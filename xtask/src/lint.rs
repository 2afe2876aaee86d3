//! `cargo xtask lint`: the source rules the compiler cannot hold by itself. Two today:
//!
//! - no catch-all arm (`_` or a bare binding) in a `match` whose arms name variants of the enums every op and event
//!   goes through (`DISPATCH_ENUMS`), so adding an op or an event makes the compiler list every place that must
//!   handle it;
//! - no function in a library crate (`LIBRARY_DIRS`) returns `Result<_, String>` (directly or as the `Output` of an
//!   `impl Future`): errors at a library boundary are typed and keep their source.
//!
//! It parses the product crates' sources with `syn`; test code (`#[cfg(test)]` modules, `tests.rs` files and the
//! `tests/` folders) is left out, where `other => panic!(..)` is the clearest way to fail. It does not look inside
//! macros (`matches!` is a predicate, not a dispatch) nor at matches over tuples or references to several enums,
//! and it reads types as written: a type alias for `Result<_, String>` is not followed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use syn::visit::Visit;

use crate::util::{repo_root, say};

/// The enums a `match` must cover variant by variant.
const DISPATCH_ENUMS: [&str; 4] = ["ClientOp", "ServerEvent", "RoomCommand", "EventBody"];

/// The folders (under the repository root) whose `.rs` files are checked.
const SOURCE_DIRS: [&str; 9] = [
    "protocol/src",
    "service/src",
    "gateway/src",
    "router-shard/src",
    "persistor/src",
    "clients/rust/src",
    "loadtest/src",
    "chaos/src",
    "testkit/src",
];

/// The folders of the library crates, where no function may return `Result<_, String>` (the binaries, tools and
/// test suites of `loadtest`, `chaos`, `xtask` and `fuzz` may).
const LIBRARY_DIRS: [&str; 7] = [
    "protocol/src",
    "service/src",
    "gateway/src",
    "router-shard/src",
    "persistor/src",
    "clients/rust/src",
    "testkit/src",
];

pub fn run(_args: &[String]) -> Result<ExitCode> {
    let findings = check(&repo_root())?;
    for finding in &findings {
        println!("{finding}");
    }
    if findings.is_empty() {
        say!(
            "lint passed: no catch-all arm over {}, no Result<_, String> returned in a library",
            DISPATCH_ENUMS.join(", ")
        );
        Ok(ExitCode::SUCCESS)
    } else {
        say!(
            "lint failed: {} findings (list every variant instead of a catch-all; return a typed error, not a String)",
            findings.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Every finding in the repository at `root`, as `path: fn name: what`.
pub fn check(root: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        collect_rs(&root.join(dir), &mut files)?;
    }
    files.sort();
    let mut findings = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let shown = file.strip_prefix(root).unwrap_or(&file).display().to_string();
        findings.extend(check_source(&shown, &text)?);
    }
    Ok(findings)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() {
            if name != "tests" {
                collect_rs(&path, out)?;
            }
        } else if name.ends_with(".rs") && name != "tests.rs" {
            out.push(path);
        }
    }
    Ok(())
}

/// The findings in one file's source; `shown` names it in them (relative to the repository root, which also tells
/// whether it belongs to a library crate).
fn check_source(shown: &str, text: &str) -> Result<Vec<String>> {
    let file = syn::parse_file(text).with_context(|| format!("parsing {shown}"))?;
    let library = LIBRARY_DIRS.iter().any(|dir| Path::new(shown).starts_with(dir));
    let mut visitor = Finder { file: shown, library, scope: Vec::new(), findings: Vec::new() };
    visitor.visit_file(&file);
    Ok(visitor.findings)
}

struct Finder<'a> {
    /// The file, as findings name it.
    file: &'a str,
    /// Whether the file belongs to a library crate (and so may not return `Result<_, String>`).
    library: bool,
    /// The functions the visitor is inside, outermost first.
    scope: Vec<String>,
    findings: Vec<String>,
}

impl Finder<'_> {
    fn report(&mut self, enum_name: &str) {
        let place = self.scope.last().map_or("(top level)".to_owned(), |f| format!("fn {f}"));
        self.findings.push(format!("{}: {place}: a catch-all arm in a match over {enum_name}", self.file));
    }

    /// Report `sig` when this is library code and it returns `Result<_, String>`.
    fn check_signature(&mut self, sig: &syn::Signature) {
        if self.library && returns_string_error(&sig.output) {
            self.findings.push(format!(
                "{}: fn {}: returns Result<_, String> (return a typed error that keeps its source)",
                self.file, sig.ident
            ));
        }
    }
}

impl<'ast> Visit<'ast> for Finder<'_> {
    fn visit_item_mod(&mut self, module: &'ast syn::ItemMod) {
        if !is_cfg_test(&module.attrs) {
            syn::visit::visit_item_mod(self, module);
        }
    }

    fn visit_item_fn(&mut self, function: &'ast syn::ItemFn) {
        if is_cfg_test(&function.attrs) {
            return;
        }
        self.check_signature(&function.sig);
        self.scope.push(function.sig.ident.to_string());
        syn::visit::visit_item_fn(self, function);
        self.scope.pop();
    }

    fn visit_impl_item_fn(&mut self, function: &'ast syn::ImplItemFn) {
        if is_cfg_test(&function.attrs) {
            return;
        }
        self.check_signature(&function.sig);
        self.scope.push(function.sig.ident.to_string());
        syn::visit::visit_impl_item_fn(self, function);
        self.scope.pop();
    }

    fn visit_trait_item_fn(&mut self, function: &'ast syn::TraitItemFn) {
        if is_cfg_test(&function.attrs) {
            return;
        }
        self.check_signature(&function.sig);
        self.scope.push(function.sig.ident.to_string());
        syn::visit::visit_trait_item_fn(self, function);
        self.scope.pop();
    }

    fn visit_expr_match(&mut self, expr: &'ast syn::ExprMatch) {
        let named = expr.arms.iter().find_map(|arm| dispatch_enum(&arm.pat));
        if let Some(enum_name) = named {
            if expr.arms.iter().any(|arm| is_catch_all(&arm.pat)) {
                self.report(&enum_name);
            }
        }
        syn::visit::visit_expr_match(self, expr);
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg") && attr.parse_args::<syn::Meta>().is_ok_and(|meta| meta.path().is_ident("test"))
    })
}

/// The dispatch enum a pattern names a variant of (`ClientOp::Send { .. }`, `&EventBody::Msg(..)`, `a | b`).
fn dispatch_enum(pat: &syn::Pat) -> Option<String> {
    let path = match pat {
        syn::Pat::Path(p) => &p.path,
        syn::Pat::Struct(p) => &p.path,
        syn::Pat::TupleStruct(p) => &p.path,
        syn::Pat::Or(p) => return p.cases.iter().find_map(dispatch_enum),
        syn::Pat::Reference(p) => return dispatch_enum(&p.pat),
        syn::Pat::Paren(p) => return dispatch_enum(&p.pat),
        syn::Pat::Ident(p) => return p.subpat.as_ref().and_then(|(_, sub)| dispatch_enum(sub)),
        _ => return None,
    };
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    let owner = segments.len().checked_sub(2).and_then(|i| segments.get(i))?;
    DISPATCH_ENUMS.contains(&owner.as_str()).then(|| owner.clone())
}

/// Does a function return `Result<_, String>`: written so, or as the `Output` of an `impl Trait` (`impl Future`)?
fn returns_string_error(output: &syn::ReturnType) -> bool {
    let syn::ReturnType::Type(_, ty) = output else {
        return false;
    };
    match ty.as_ref() {
        syn::Type::ImplTrait(bounds) => bounds.bounds.iter().any(|bound| {
            let syn::TypeParamBound::Trait(bound) = bound else {
                return false;
            };
            bound.path.segments.iter().any(|segment| {
                let syn::PathArguments::AngleBracketed(args) = &segment.arguments else {
                    return false;
                };
                args.args.iter().any(|arg| {
                    matches!(arg, syn::GenericArgument::AssocType(assoc)
                        if assoc.ident == "Output" && is_string_result(&assoc.ty))
                })
            })
        }),
        other => is_string_result(other),
    }
}

/// `Result<T, String>` (any path to `Result` and to `String`, in parentheses or not).
fn is_string_result(ty: &syn::Type) -> bool {
    let ty = match ty {
        syn::Type::Paren(inner) => return is_string_result(&inner.elem),
        syn::Type::Group(inner) => return is_string_result(&inner.elem),
        syn::Type::Path(path) if path.qself.is_none() => path,
        _ => return false,
    };
    let Some(last) = ty.path.segments.last() else {
        return false;
    };
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return false;
    };
    let types: Vec<&syn::Type> = args
        .args
        .iter()
        .filter_map(|arg| match arg {
            syn::GenericArgument::Type(ty) => Some(ty),
            _ => None,
        })
        .collect();
    last.ident == "Result" && types.len() == 2 && types.get(1).is_some_and(|error| is_string(error))
}

/// `String`, `std::string::String` or `alloc::string::String`.
fn is_string(ty: &syn::Type) -> bool {
    match ty {
        syn::Type::Paren(inner) => is_string(&inner.elem),
        syn::Type::Group(inner) => is_string(&inner.elem),
        syn::Type::Path(path) if path.qself.is_none() => {
            path.path.segments.last().is_some_and(|last| last.ident == "String" && last.arguments.is_none())
        }
        _ => false,
    }
}

/// `_`, or a binding that takes whatever is left (`other`), with or without a guard.
fn is_catch_all(pat: &syn::Pat) -> bool {
    match pat {
        syn::Pat::Wild(_) => true,
        syn::Pat::Ident(p) => {
            p.subpat.is_none() && p.ident.to_string().starts_with(|c: char| c.is_lowercase() || c == '_')
        }
        syn::Pat::Or(p) => p.cases.iter().any(is_catch_all),
        syn::Pat::Reference(p) => is_catch_all(&p.pat),
        syn::Pat::Paren(p) => is_catch_all(&p.pat),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(source: &str) -> Vec<String> {
        check_source("x.rs", source).unwrap()
    }

    #[test]
    fn a_catch_all_over_a_dispatch_enum_is_found() {
        let source = "fn f(op: ClientOp) { match op { ClientOp::Ping => {}, _ => {} } }
                      impl S { fn g(&self, e: &EventBody) -> u8 { match e { &EventBody::Msg { .. } => 1, other => 2 } } }";
        assert_eq!(
            findings(source),
            [
                "x.rs: fn f: a catch-all arm in a match over ClientOp",
                "x.rs: fn g: a catch-all arm in a match over EventBody"
            ]
        );
        let guarded =
            "fn f(op: ClientOp) { match op { ClientOp::Ping | ClientOp::Auth { .. } => {}, _ if true => {} } }";
        assert_eq!(findings(guarded).len(), 1, "a guarded wildcard is still a catch-all");
    }

    #[test]
    fn every_variant_listed_other_enums_and_test_code_pass() {
        let listed = "fn f(op: ClientOp) { match op { ClientOp::Ping => {}, ClientOp::Auth { .. } => {} } }";
        assert!(findings(listed).is_empty());
        let other_enum = "fn f(x: Option<u8>) { match x { Some(_) => {}, _ => {} } }";
        assert!(findings(other_enum).is_empty());
        let in_tests = "#[cfg(test)] mod tests { fn f(op: ClientOp) { match op { ClientOp::Ping => {}, _ => {} } } }";
        assert!(findings(in_tests).is_empty());
    }
    fn library_findings(source: &str) -> Vec<String> {
        check_source("gateway/src/x.rs", source).unwrap()
    }

    #[test]
    fn a_string_error_returned_by_a_library_is_found() {
        let source = "pub fn f() -> Result<u8, String> { Ok(1) }
                      impl S { async fn g(&self) -> std::result::Result<(), std::string::String> { Ok(()) } }
                      trait T { fn h(&self) -> impl Future<Output = Result<(), String>> + Send; }";
        assert_eq!(
            library_findings(source),
            [
                "gateway/src/x.rs: fn f: returns Result<_, String> (return a typed error that keeps its source)",
                "gateway/src/x.rs: fn g: returns Result<_, String> (return a typed error that keeps its source)",
                "gateway/src/x.rs: fn h: returns Result<_, String> (return a typed error that keeps its source)",
            ]
        );
        let nested = "fn outer() { fn inner() -> Result<(), String> { Ok(()) } }";
        assert_eq!(library_findings(nested).len(), 1, "a function inside a function is a function too");
        let router_shard = check_source("router-shard/src/room.rs", "fn f() -> Result<(), String> { Ok(()) }");
        assert_eq!(router_shard.unwrap().len(), 1, "every library crate is checked");
    }

    #[test]
    fn typed_errors_tools_and_test_code_pass() {
        let typed = "fn f() -> Result<u8, MyError> { Ok(1) }
                     fn g() -> Option<String> { None }
                     fn h() -> io::Result<String> { Ok(String::new()) }
                     fn i() -> Result<String, Box<dyn Error>> { Ok(String::new()) }";
        assert!(library_findings(typed).is_empty());
        let in_tests = "#[cfg(test)] mod tests { fn f() -> Result<(), String> { Ok(()) } }";
        assert!(library_findings(in_tests).is_empty());
        let test_fn = "#[cfg(test)] fn f() -> Result<(), String> { Ok(()) }";
        assert!(library_findings(test_fn).is_empty());
        let tool = "fn f() -> Result<(), String> { Ok(()) }";
        assert!(check_source("loadtest/src/x.rs", tool).unwrap().is_empty(), "tools may");
        assert!(check_source("x.rs", tool).unwrap().is_empty(), "outside a library crate");
    }
}
