//! Reading Linux `/proc`: which processes exist, their command lines and environments, and
//! their state and process group — to find the processes a test or a run caused (engines
//! outlive the agent that started them by design) and to check that none is left — and
//! their resident memory (to check that a process did not grow).

/// Pids of every process visible now.
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
}

/// The raw command line of `pid` (arguments separated by NUL bytes).
pub fn cmdline(pid: u32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// The command line of `pid`, one word each (empty if the process is gone).
pub fn args(pid: u32) -> Vec<String> {
    split_nul(&cmdline(pid).unwrap_or_default())
}

/// The raw environment of `pid` (`KEY=value` entries separated by NUL bytes), if readable.
pub fn environ(pid: u32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/environ")).ok()
}

/// The non-empty NUL-separated words of `raw`.
pub fn split_nul(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// The fields of `/proc/<pid>/stat` the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `T`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    pub ppid: u32,
    /// The process group.
    pub pgrp: u32,
}

impl Stat {
    /// Neither a zombie nor dead.
    pub fn is_live(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

/// Parses a `/proc/<pid>/stat` line. The command name, in parentheses, may itself hold
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(Stat { state, ppid, pgrp })
}

/// The state of `pid`, or `None` if it is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True while `pid` exists and is neither a zombie nor dead.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.is_live())
}

/// Live (non-zombie) processes of process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    pids().filter(|pid| stat(*pid).is_some_and(|s| s.state != 'Z' && s.pgrp == pgid)).collect()
}

/// The pid of a process whose command line holds every one of `words` (as whole words).
pub fn find_process(words: &[&str]) -> Option<u32> {
    pids().find(|pid| {
        let Some(raw) = cmdline(*pid) else { return false };
        let args = split_nul(&raw);
        words.iter().all(|w| args.iter().any(|a| a == w))
    })
}

/// The `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut f = line["VmRSS:".len()..].split_whitespace();
    let kib = f.next()?.parse().ok()?;
    (f.next() == Some("kB")).then_some(kib)
}

/// The resident set size of `pid` in KiB, or `None` if it is gone (or a kernel thread).
pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_the_vmrss_line() {
        let table: &[(&str, Option<u64>)] = &[
            ("Name:\tflotilla\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads: 4\n", Some(12345)),
            ("VmRSS: 7 kB", Some(7)),
            ("VmRSS: 7 MB", None),
            ("VmRSS: x kB", None),
            ("Name: kthreadd\n", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_rss_kib(text), *want, "{text:?}");
        }
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn stat_lines_parse_after_the_last_parenthesis() {
        let s = |state, ppid, pgrp| Some(Stat { state, ppid, pgrp });
        let table: &[(&str, Option<Stat>)] = &[
            ("42 (sleep) S 1 42 42 0 -1", s('S', 1, 42)),
            ("7 (vllm (worker) x) R 3 5 5 0", s('R', 3, 5)),
            ("9 (a) b) Z 2 9 9", s('Z', 2, 9)),
            ("9 (sim) T 2", None),
            ("no parenthesis", None),
            ("", None),
        ];
        for (line, want) in table {
            assert_eq!(parse_stat(line), *want, "{line:?}");
        }
    }

    #[test]
    fn zombies_and_dead_processes_are_not_live() {
        for (state, live) in [('R', true), ('S', true), ('D', true), ('T', true), ('Z', false), ('X', false)] {
            assert_eq!(Stat { state, ppid: 1, pgrp: 1 }.is_live(), live, "{state}");
        }
    }

    #[test]
    fn nul_separated_words_skip_empty_ones() {
        assert_eq!(split_nul(b"vllm\0serve\0--port\08000\0"), ["vllm", "serve", "--port", "8000"]);
        assert_eq!(split_nul(b""), Vec::<String>::new());
        assert_eq!(split_nul(b"a\0\0b"), ["a", "b"]);
    }

    #[test]
    fn this_process_is_found_alive_in_its_group() {
        let me = std::process::id();
        assert!(pids().any(|p| p == me));
        assert!(alive(me));
        let pgrp = stat(me).expect("own stat").pgrp;
        assert!(group_members(pgrp).contains(&me));
        assert!(!args(me).is_empty());
    }
}
