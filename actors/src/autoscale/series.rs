//! Test harness: replays a recorded load series through `decide` once a second, as the
//! actor will: record each ready replica's engine sample and the gateways' sample, decide,
//! and apply the desired count (new replicas turn ready after `startup_ms`).
use flotilla_api::spec::AutoscalingSpec;
use flotilla_api::{Manifest, ObjectName, Spec};

use super::{decide, Decision, EngineSample, GatewaySample, ScalerState, Signals};

/// Parses `autoscaling: <flow YAML>` through the real manifest path (validation included).
pub(crate) fn spec(flow: &str) -> AutoscalingSpec {
    let text = format!("kind: Model\nmetadata: {{name: m}}\nspec:\n  source: hf://m\n  autoscaling: {flow}\n");
    match Manifest::parse(&text).unwrap_or_else(|e| panic!("{flow}: {e}")).spec {
        Spec::Model(m) => *m.autoscaling.expect("autoscaling"),
        _ => unreachable!(),
    }
}

/// What one second of the series looks like: a sample per ready replica (fewer: the rest
/// are not recorded) and the gateways' sample (`None`: no gateway reported).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tick {
    pub engine: Vec<EngineSample>,
    pub gateway: Option<GatewaySample>,
}

/// `total` waiting requests spread evenly over `ready` replicas, each also running a few.
pub(crate) fn waiting(total: f64, ready: u32) -> Tick {
    let per = if ready == 0 { 0.0 } else { total / f64::from(ready) };
    let s = EngineSample { running: Some(per.min(8.0)), waiting: Some(per), ..EngineSample::default() };
    Tick { engine: vec![s; ready as usize], gateway: None }
}

/// Gateway-only traffic: `in_flight` requests being served, `held` waiting for a replica.
pub(crate) fn gateway(in_flight: f64, held: f64, arrivals: f64) -> GatewaySample {
    GatewaySample { in_flight, held, arrivals_per_s: arrivals, completed_per_s: arrivals, ..GatewaySample::default() }
}

pub(crate) struct Replay {
    pub spec: AutoscalingSpec,
    pub signals: Signals,
    pub state: ScalerState,
    pub current: u32,
    pub ready: u32,
    pub now_ms: u64,
    pub wall_ms: i64,
    pub startup_ms: u64,
    /// When each starting replica turns ready.
    starting: Vec<u64>,
    /// Every decision, with the second it was made at (seconds since the start).
    pub log: Vec<(u64, Decision)>,
}

impl Replay {
    pub fn new(spec: AutoscalingSpec, replicas: u32) -> Replay {
        Replay {
            signals: Signals::for_spec(&spec),
            spec,
            state: ScalerState::new(),
            current: replicas,
            ready: replicas,
            now_ms: 0,
            wall_ms: 1_768_000_000_000,
            startup_ms: 0,
            starting: Vec::new(),
            log: Vec::new(),
        }
    }

    fn name(i: u32) -> ObjectName {
        format!("m-{i}").parse().expect("a DNS label")
    }

    /// One second: record, decide, apply.
    pub fn step(&mut self, tick: Tick) -> Decision {
        self.now_ms += 1000;
        self.wall_ms += 1000;
        let now = self.now_ms;
        let turned = self.starting.iter().filter(|t| **t <= now).count() as u32;
        self.starting.retain(|t| *t > now);
        self.ready += turned;
        for (i, s) in tick.engine.iter().take(self.ready as usize).enumerate() {
            self.signals.record_engine(&Replay::name(i as u32), now, *s);
        }
        if let Some(g) = tick.gateway {
            self.signals.record_gateway(now, g);
        }
        let d = decide(&self.spec, &self.signals, self.current, self.ready, &mut self.state, now, self.wall_ms);
        if d.desired > self.current {
            let add = d.desired - self.current;
            if self.startup_ms == 0 {
                self.ready += add;
            } else {
                self.starting.extend((0..add).map(|_| now + self.startup_ms));
            }
        } else if d.desired < self.current {
            let remove = self.current - d.desired;
            let from_starting = remove.min(self.starting.len() as u32);
            self.starting.truncate(self.starting.len() - from_starting as usize);
            self.ready -= remove - from_starting;
            for i in self.ready..self.current {
                self.signals.remove_replica(&Replay::name(i), now);
            }
        }
        self.current = d.desired;
        self.log.push((now / 1000, d.clone()));
        d
    }

    /// `secs` seconds of `f(second, ready)`.
    pub fn run(&mut self, secs: u64, mut f: impl FnMut(u64, u32) -> Tick) -> Decision {
        let mut last = None;
        for _ in 0..secs {
            let t = self.now_ms / 1000;
            let tick = f(t, self.ready);
            last = Some(self.step(tick));
        }
        last.expect("at least one second")
    }

    /// The second of the first logged decision matching `p`, at or after `from`.
    pub fn first(&self, from: u64, p: impl Fn(&Decision) -> bool) -> Option<u64> {
        self.log.iter().find(|(t, d)| *t >= from && p(d)).map(|(t, _)| *t)
    }
}
