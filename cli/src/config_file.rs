//! `--config FILE` for the long-running roles (`server`, `agent`, `gateway`, `sim`): a TOML
//! file whose keys are the role's flags (`grpc_addr = "0.0.0.0:7070"`, or `grpc-addr`), and
//! the global ones (`server`, `tls_cert`, …). The file's values become flags placed before
//! the command line's, so clap validates them as it validates flags; a flag given on the
//! command line, or set through its `FLOTILLA_*` environment variable, wins over the file.
//!
//! Values: a string, number or boolean for a flag with one value (`true` turns a switch on,
//! `false` leaves it off), an array for a flag that repeats (`backend = ["a=http://…"]`).
//! An unknown key, a table, or a value of the wrong shape is an error naming the key and its
//! line (exit code 2), before anything starts.
use std::collections::BTreeMap;
use std::ffi::OsString;

use clap::{ArgAction, Command};
use toml_edit::{Document, Item, Value};

/// The subcommands that read `--config`.
pub const ROLES: &[&str] = &["server", "agent", "gateway", "sim"];

/// A problem with a config file, worded for the operator.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

/// `argv` with the config file's flags inserted after the role's name, when the command
/// is a role and `--config FILE` (or `FLOTILLA_CONFIG`) names a file. `env` looks up an
/// environment variable (the process's, or a test's).
pub fn expand(
    cli: &Command,
    argv: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<OsString>, ConfigError> {
    let args: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let Some(role_at) = subcommand_at(cli, &args).filter(|i| ROLES.contains(&args[*i].as_str())) else {
        return Ok(argv);
    };
    let path = flag_value(&args, "--config").or_else(|| env("FLOTILLA_CONFIG").filter(|v| !v.is_empty()));
    let Some(path) = path else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError(format!("config file {path}: {e}")))?;
    let role = cli.find_subcommand(&args[role_at]).ok_or_else(|| ConfigError("no such role".into()))?;
    let flags = file_flags(&path, &text, cli, role, &args, env)?;
    let mut out = argv;
    let tail = out.split_off(role_at + 1);
    out.extend(flags.into_iter().map(OsString::from));
    out.extend(tail);
    Ok(out)
}

/// Where the subcommand's name is: the first word that is neither a flag nor the value of
/// a global flag before it.
fn subcommand_at(cli: &Command, args: &[String]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        if let Some(long) = a.strip_prefix("--") {
            let takes = cli.get_arguments().any(|x| x.get_long() == Some(long) && x.get_action().takes_values());
            i += if takes { 2 } else { 1 };
        } else if let Some(short) = a.strip_prefix('-').and_then(|s| s.chars().next()).filter(|_| a.len() == 2) {
            let takes = cli.get_arguments().any(|x| x.get_short() == Some(short) && x.get_action().takes_values());
            i += if takes { 2 } else { 1 };
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(i);
        }
    }
    None
}

/// The value of `--name V` or `--name=V` in `args`.
fn flag_value(args: &[String], name: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == name {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_owned());
        }
    }
    None
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// The flags `text` stands for, for `role` (and the global flags of `cli`), skipping those
/// the command line or the environment already sets.
fn file_flags(
    path: &str,
    text: &str,
    cli: &Command,
    role: &Command,
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ConfigError> {
    let doc = Document::parse(text).map_err(|e| ConfigError(format!("config file {path}: {e}")))?;
    let known: BTreeMap<String, &clap::Arg> = role
        .get_arguments()
        .chain(cli.get_arguments().filter(|a| a.is_global_set()))
        .filter_map(|a| Some((a.get_long()?.to_owned(), a)))
        .filter(|(long, _)| !matches!(long.as_str(), "config" | "help" | "version" | "output"))
        .collect();
    let mut out = Vec::new();
    for (key, item) in doc.as_table().iter() {
        let line = doc.as_table().key(key).and_then(|k| k.span()).map_or(0, |s| line_of(text, s.start));
        let at = |why: String| ConfigError(format!("config file {path} line {line}: {why}"));
        let long = key.replace('_', "-");
        let Some(arg) = known.get(&long) else {
            let names: Vec<String> = known.keys().map(|k| k.replace('-', "_")).collect();
            return Err(at(format!(
                "unknown key `{key}` for `flotilla {}` (known: {})",
                role.get_name(),
                names.join(", ")
            )));
        };
        let flag = format!("--{long}");
        let on_command_line = args.iter().any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        let in_env = arg.get_env().and_then(|v| v.to_str()).is_some_and(|v| env(v).is_some());
        if on_command_line || in_env {
            continue;
        }
        let Item::Value(value) = item else {
            return Err(at(format!("`{key}` must be a value, not a table")));
        };
        let takes_value = arg.get_action().takes_values();
        let repeats = matches!(arg.get_action(), ArgAction::Append);
        match value {
            Value::Boolean(b) if !takes_value => {
                if *b.value() {
                    out.push(flag);
                }
            }
            Value::Array(items) if repeats => {
                for v in items.iter() {
                    out.push(format!(
                        "{flag}={}",
                        scalar(v).ok_or_else(|| at(format!("`{key}` items must be strings or numbers")))?
                    ));
                }
            }
            v if takes_value => {
                let s = scalar(v).ok_or_else(|| {
                    at(format!("`{key}` takes one value (a string, number or boolean), got {}", v.type_name()))
                })?;
                out.push(format!("{flag}={s}"));
            }
            v => return Err(at(format!("`{key}` is a switch: true or false, got {}", v.type_name()))),
        }
    }
    Ok(out)
}

/// A scalar TOML value as a flag's text.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.value().clone()),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::Float(f) => Some(f.value().to_string()),
        Value::Boolean(b) => Some(b.value().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    use super::*;

    fn cli() -> Command {
        Command::new("flotilla")
            .arg(Arg::new("server").long("server").global(true).env("FLOTILLA_SERVER"))
            .arg(Arg::new("config").long("config").global(true))
            .subcommand(
                Command::new("gateway")
                    .arg(Arg::new("listen").long("listen"))
                    .arg(Arg::new("no-auth").long("no-auth").action(ArgAction::SetTrue))
                    .arg(Arg::new("backend").long("backend").action(ArgAction::Append))
                    .arg(Arg::new("scrape-interval-ms").long("scrape-interval-ms").env("FLOTILLA_SCRAPE")),
            )
            .subcommand(Command::new("get"))
    }

    fn run(toml: &str, argv: &[&str], env: &[(&str, &str)]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let mut args: Vec<OsString> = argv.iter().map(OsString::from).collect();
        args.extend([OsString::from("--config"), path.clone().into_os_string()]);
        let env = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let out = expand(&cli(), args, &env).map_err(|e| e.0.replace(&path.display().to_string(), "FILE"))?;
        Ok(out.into_iter().map(|a| a.to_string_lossy().into_owned()).filter(|a| !a.ends_with("c.toml")).collect())
    }

    #[test]
    fn keys_become_flags_before_the_command_lines() {
        let toml = "listen = \"0.0.0.0:8080\"\nno_auth = true\nbackend = [\"m=http://a\", \"m=http://b\"]\nscrape-interval-ms = 500\nserver = \"10.0.0.1:7070\"\n";
        let got = run(toml, &["flotilla", "gateway", "--listen", "127.0.0.1:9"], &[]).unwrap();
        assert_eq!(
            got,
            [
                "flotilla",
                "gateway",
                "--no-auth",
                "--backend=m=http://a",
                "--backend=m=http://b",
                "--scrape-interval-ms=500",
                "--server=10.0.0.1:7070",
                "--listen",
                "127.0.0.1:9",
                "--config"
            ],
            "--listen from the command line wins"
        );
    }

    #[test]
    fn the_environment_wins_over_the_file_and_false_leaves_a_switch_off() {
        let got =
            run("scrape_interval_ms = 500\nno_auth = false\n", &["flotilla", "gateway"], &[("FLOTILLA_SCRAPE", "9")]);
        assert_eq!(got.unwrap(), ["flotilla", "gateway", "--config"]);
    }

    #[test]
    fn bad_files_are_errors_naming_the_key_and_line() {
        let argv = &["flotilla", "gateway"];
        let e = run("listen = \"x\"\n\nlisten_addr = 1\n", argv, &[]).unwrap_err();
        assert!(e.contains("FILE line 3: unknown key `listen_addr`") && e.contains("known: "), "{e}");
        let e = run("[listen]\nx = 1\n", argv, &[]).unwrap_err();
        assert!(e.contains("line 1") && e.contains("not a table"), "{e}");
        let e = run("no_auth = \"yes\"\n", argv, &[]).unwrap_err();
        assert!(e.contains("`no_auth` is a switch"), "{e}");
        let e = run("listen = [1]\n", argv, &[]).unwrap_err();
        assert!(e.contains("`listen` takes one value"), "{e}");
        let e = run("listen = \n", argv, &[]).unwrap_err();
        assert!(e.contains("config file FILE"), "{e}");
    }

    #[test]
    fn only_roles_read_it() {
        let got = run("nonsense = 1\n", &["flotilla", "get"], &[]).unwrap();
        assert_eq!(got, ["flotilla", "get", "--config"], "not a role: untouched");
        let got = run("listen = \"x\"\n", &["flotilla", "--server", "gateway", "get"], &[]).unwrap();
        assert_eq!(got, ["flotilla", "--server", "gateway", "get", "--config"], "a flag's value is not the role");
    }
}
