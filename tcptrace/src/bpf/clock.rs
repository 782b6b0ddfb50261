//! The kernel's tick rate (HZ), taken from the running kernel: a BPF
//! program run returns jiffies and CLOCK_MONOTONIC of the same moment;
//! sampled for a few dozen ticks, exactly one CONFIG_HZ value fits them.
//! The kernel configuration file is only a fallback (a DaemonSet mounts no
//! /boot; RHEL-family kernels have no /proc/config.gz).
use std::{fs, io::Read as _, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::Array,
    programs::{SocketFilter, TestRun as _, TestRunOptions},
};
use tcptrace_common::{CLOCK_MAP, CLOCK_PROGRAM};

use crate::model::{TickRate, TickSource};

/// Used only when neither measuring nor the configuration file works.
pub const DEFAULT_HZ: u32 = 250;

/// Every CONFIG_HZ choice of the kernel's architectures.
const KNOWN_HZ: &[u32] = &[
    24, 32, 48, 64, 100, 128, 200, 250, 256, 300, 500, 1000, 1024, 1200,
];

/// Sampling time; doubled while more than one value fits (few samples
/// near tick edges on a busy machine, late ticks), up to
/// [`MAX_WINDOW_NS`].
const WINDOW_NS: u64 = 50_000_000;
const MAX_WINDOW_NS: u64 = 400_000_000;
/// How late after its edge a tick may update jiffies, as a share of the
/// tick (interrupt latency: a millisecond under emulation at 250 Hz).
const LATE_FRACTION: f64 = 0.3;

/// The tick rate, and where it came from; a fallback is said on stderr.
pub(super) fn tick_rate(ebpf: &mut Ebpf) -> TickRate {
    let measured = measure_with_bpf(ebpf);
    // The program is needed only once.
    if let Some(prog) = ebpf.program_mut(CLOCK_PROGRAM) {
        let _ = TryInto::<&mut SocketFilter>::try_into(prog).map(SocketFilter::unload);
    }
    let why = match measured {
        Ok(hz) => {
            return TickRate {
                hz,
                source: TickSource::Measured,
            };
        }
        Err(e) => format!("{e:#}"),
    };
    let rate = match config_hz() {
        Some((hz, path)) => TickRate {
            hz,
            source: TickSource::Config(path),
        },
        None => TickRate {
            hz: DEFAULT_HZ,
            source: TickSource::Assumed(format!(
                "measuring failed ({why}) and no kernel configuration file was found"
            )),
        },
    };
    eprintln!(
        "tcptrace: could not measure the kernel tick rate ({why}): idle times use {}",
        rate.describe()
    );
    rate
}

fn measure_with_bpf(ebpf: &mut Ebpf) -> Result<u32> {
    let prog: &mut SocketFilter = ebpf
        .program_mut(CLOCK_PROGRAM)
        .ok_or_else(|| anyhow!("BPF object has no {CLOCK_PROGRAM} program"))?
        .try_into()
        .context("the clock program is not a socket filter")?;
    prog.load()
        .context("loading the clock program (bpf_jiffies64 needs Linux 5.5)")?;
    let prog: &SocketFilter = ebpf
        .program(CLOCK_PROGRAM)
        .ok_or_else(|| anyhow!("BPF object has no {CLOCK_PROGRAM} program"))?
        .try_into()
        .context("the clock program is not a socket filter")?;
    let map = ebpf
        .map(CLOCK_MAP)
        .ok_or_else(|| anyhow!("BPF object has no {CLOCK_MAP} map"))?;
    let clock = Array::<_, u64>::try_from(map).context("opening the clock map")?;
    // A socket filter's test run needs at least an Ethernet header.
    let packet = [0u8; 64];
    let sample = || -> Result<Sample> {
        let run = prog
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                ..TestRunOptions::default()
            })
            .context("running the clock program (BPF_PROG_TEST_RUN)")?;
        let ns = clock.get(&0, 0).context("reading the clock map")?;
        Ok(Sample {
            jiffies: run.return_value,
            ns,
        })
    };
    measure_hz(sample)
}

/// Jiffies (low 32 bits) and CLOCK_MONOTONIC (ns) read in one program run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    jiffies: u32,
    ns: u64,
}

/// How far ticks of `hz` are from explaining every sample: jiffies counts
/// edges at `phase + j * period`, so each sample's `ns - j * period` lies
/// within one period of the others, plus how late ticks updated it.
fn spread_excess(samples: &[Sample], hz: u32) -> f64 {
    let period = 1e9 / f64::from(hz);
    let (j0, t0) = (samples[0].jiffies, samples[0].ns);
    let (mut low, mut high) = (f64::MAX, f64::MIN);
    for s in samples {
        let offset = s.ns.wrapping_sub(t0) as f64 - f64::from(s.jiffies.wrapping_sub(j0)) * period;
        low = low.min(offset);
        high = high.max(offset);
    }
    high - low - period
}

/// Samples until exactly one CONFIG_HZ value explains them.
fn measure_hz(mut sample: impl FnMut() -> Result<Sample>) -> Result<u32> {
    let first = sample()?;
    let mut samples = vec![first];
    let mut window = WINDOW_NS;
    loop {
        let s = sample()?;
        samples.push(s);
        if s.ns.saturating_sub(first.ns) < window {
            continue;
        }
        let ticks = s.jiffies.wrapping_sub(first.jiffies);
        if ticks < 2 {
            bail!("jiffies advanced {ticks} in {} ms", window / 1_000_000);
        }
        // The true rate leaves only the ticks' lateness; a wrong one adds
        // its drift over the window.
        let fits: Vec<u32> = KNOWN_HZ
            .iter()
            .copied()
            .filter(|&hz| spread_excess(&samples, hz) <= LATE_FRACTION * 1e9 / f64::from(hz))
            .collect();
        match fits[..] {
            [hz] => return Ok(hz),
            [] => bail!(
                "no CONFIG_HZ value fits {ticks} ticks in {:.1} ms ({} samples)",
                s.ns.saturating_sub(first.ns) as f64 / 1e6,
                samples.len()
            ),
            _ if window < MAX_WINDOW_NS => {}
            _ => bail!(
                "{fits:?} Hz all fit {ticks} ticks in {} ms ({} samples)",
                window / 1_000_000,
                samples.len()
            ),
        }
        window *= 2;
    }
}

/// CONFIG_HZ from /proc/config.gz or /boot/config-<release>, and the file.
pub fn config_hz() -> Option<(u32, String)> {
    let mut text = String::new();
    let path = if let Ok(f) = fs::File::open("/proc/config.gz") {
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .ok()?;
        "/proc/config.gz".to_string()
    } else {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let path = Path::new("/boot").join(format!("config-{}", release.trim()));
        text = fs::read_to_string(&path).ok()?;
        path.display().to_string()
    };
    Some((parse_config_hz(&text)?, path))
}

fn parse_config_hz(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel ticking at `hz` from `phase_ns`, sampled every `step_ns`,
    /// with a pause of `pause.1` ns (preemption) every `pause.0` samples.
    fn kernel(hz: u64, phase_ns: u64, step_ns: u64, pause: (u64, u64)) -> Result<u32> {
        late_kernel(hz, phase_ns, step_ns, pause, 0)
    }

    /// The same, each tick updating jiffies up to `late_ns` after its edge
    /// (interrupt latency: large under emulation).
    fn late_kernel(
        hz: u64,
        phase_ns: u64,
        step_ns: u64,
        pause: (u64, u64),
        late_ns: u64,
    ) -> Result<u32> {
        let mut t = 1_000_000_000u64;
        let mut n = 0;
        let edge = |k: u64| (k * 1_000_000_000).div_ceil(hz) + (k * 7919 % 1000) * late_ns / 1000;
        measure_hz(|| {
            n += 1;
            t += step_ns + if n % pause.0 == 0 { pause.1 } else { 0 };
            let mut k = (t + phase_ns) * hz / 1_000_000_000;
            if edge(k) > t + phase_ns {
                k -= 1;
            }
            Ok(Sample {
                jiffies: k as u32,
                ns: t,
            })
        })
    }

    #[test]
    fn measures_each_config_hz_exactly() {
        for hz in [100, 250, 256, 300, 1000, 1024] {
            for phase in [0, 1_234_567, 3_999_999] {
                assert_eq!(
                    kernel(hz, phase, 20_000, (1_000_000, 0)).unwrap(),
                    hz as u32,
                    "{hz} {phase}"
                );
                // Preempted for 3.7 ms every 0.2 ms of sampling.
                assert_eq!(
                    kernel(hz, phase, 20_000, (10, 3_700_000)).unwrap(),
                    hz as u32,
                    "{hz} {phase} preempted"
                );
                // Ticks up to a quarter tick late (1 ms at 250 Hz: qemu
                // without KVM), and slow runs.
                assert_eq!(
                    late_kernel(hz, phase, 40_000, (10, 3_700_000), 250_000_000 / hz).unwrap(),
                    hz as u32,
                    "{hz} {phase} late"
                );
            }
        }
    }

    #[test]
    fn refuses_to_guess() {
        // A rate no kernel configures is reported, not rounded.
        let err = kernel(150, 0, 20_000, (1_000_000, 0))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("no CONFIG_HZ value fits"), "{err}");
        let mut t = 0;
        let err = measure_hz(|| {
            t += 1_000_000;
            Ok(Sample { jiffies: 7, ns: t })
        })
        .unwrap_err()
        .to_string();
        assert_eq!(err, "jiffies advanced 0 in 50 ms");
    }

    #[test]
    fn reads_config_hz() {
        assert_eq!(
            parse_config_hz("# x\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(parse_config_hz("CONFIG_HZ_1000=y\n"), None);
    }
}
