//! `serve` flags → a validated configuration ("parse, don't validate"):
//! every check of a flag's value happens here, and every error names its
//! flag. Nothing here reads the environment or exits; the caller passes in
//! what systemd asked for.

use std::time::Duration;

use tradeid::policy::{self, SourcePolicy};
use tradeid::protocol::MAX_BATCH_LIMIT;
use tradeid::GeneratorConfig;
use tradeid_udp::SocketOptions;

use crate::errors::ConfigError;
use crate::flags::{EtcdArgs, ServeArgs};
use crate::{cluster, control, dataplane};

/// A validated `serve` configuration: one part per plane.
#[derive(Debug, Clone)]
pub(crate) struct ServeConfig {
    /// What the data plane runs with.
    pub(crate) data: dataplane::Config,
    /// What the control plane runs with.
    pub(crate) control: control::Config,
}

impl ServeConfig {
    /// Validates the flags. `watchdog` is the systemd watchdog interval, if
    /// any: workers must wake often enough to feed it; `etcd_password` is
    /// `TRADEID_ETCD_PASSWORD`, if set.
    pub(crate) fn from_args(
        args: &ServeArgs,
        watchdog: Option<Duration>,
        etcd_password: Option<String>,
    ) -> anyhow::Result<ServeConfig> {
        if !(1..=MAX_BATCH_LIMIT).contains(&args.max_batch) {
            return Err(anyhow::anyhow!(ConfigError(format!(
                "--max-batch {} is out of range: it must be 1..={MAX_BATCH_LIMIT} (a reply must fit one UDP datagram)",
                args.max_batch
            ))));
        }
        let allowed = dataplane::allowed_cpus();
        let cpus: Vec<usize> = match &args.cpus {
            Some(list) => parse_cpu_list(list)?,
            None => allowed.clone(),
        };
        if let Some(bad) = cpus.iter().find(|c| !allowed.is_empty() && !allowed.contains(c)) {
            return Err(ConfigError(format!(
                "--cpus includes CPU {bad}, which is outside this process's affinity mask {allowed:?}"
            ))
            .into());
        }
        let workers = args.workers.unwrap_or(cpus.len().max(1));
        if !(1..=MAX_WORKERS).contains(&workers) {
            let waste = tradeid::generator::max_waste_per_restart(args.block_max, workers);
            return Err(ConfigError(format!(
                "--workers {workers} is out of range: it must be 1..={MAX_WORKERS}. Each worker holds up to two blocks \
                 of --block-max {} IDs, so {workers} workers could skip {waste} IDs ({:.2}% of the space) at every restart",
                args.block_max,
                100.0 * waste as f64 / (1u64 << 35) as f64
            ))
            .into());
        }
        if !cpus.is_empty() && workers > cpus.len() {
            tracing::warn!(
                workers,
                cpus = cpus.len(),
                "more workers than CPUs: the extra workers only add context switches, and each holds up to two blocks that a restart skips"
            );
        }
        let worker_cpus =
            (0..workers).map(|i| if cpus.is_empty() { None } else { Some(cpus[i % cpus.len()]) }).collect::<Vec<_>>();
        if args.cpu_steering && worker_cpus.iter().enumerate().any(|(i, c)| *c != Some(i)) {
            return Err(ConfigError(
                "--cpu-steering needs worker i pinned to CPU i (use --cpus 0-N with as many workers as CPUs)".into(),
            )
            .into());
        }
        let rate_limit = args.rate_limit.as_deref().map(parse_rate).transpose()?;
        if args.block_max == 0 || args.block_max > 1 << 30 {
            return Err(
                ConfigError(format!("--block-max {} is out of range: it must be 1..=2^30", args.block_max)).into()
            );
        }
        let least = 4 * u64::from(args.max_batch);
        if args.block_max < least {
            return Err(ConfigError(format!(
                "--block-max {} is below 4 x --max-batch ({least}): a block would hold fewer than four of the largest \
                 requests, so workers would keep running dry and answer !ERR503. Use --block-max {least} or more",
                args.block_max
            ))
            .into());
        }
        let defaults = GeneratorConfig::default();
        let mut data = dataplane::Config {
            state: args.state.clone(),
            create: args.create,
            partition: args.node.zip(args.nodes),
            listen: args.listen,
            worker_cpus,
            max_batch: args.max_batch,
            policy: SourcePolicy {
                allow: if args.allow.is_empty() { policy::default_allow() } else { args.allow.clone() },
                trust: if args.trust.is_empty() { policy::default_trust() } else { args.trust.clone() },
            },
            rate_limit,
            sockets: SocketOptions {
                recv_buffer: args.recv_buffer,
                send_buffer: args.send_buffer,
                // Workers beat at least once per receive timeout; keep that
                // well inside half a watchdog interval so an idle, healthy
                // worker never looks stuck.
                read_timeout: watchdog.map_or(dataplane::WORKER_WAKE, |w| {
                    (w / 4).clamp(Duration::from_millis(1), dataplane::WORKER_WAKE)
                }),
            },
            generator: GeneratorConfig {
                block_max: args.block_max,
                // A request then spans at most the current block and the
                // prefetched one, so replies are full in steady state.
                block_min: defaults.block_min.max(4 * u64::from(args.max_batch)).min(args.block_max),
                abort_on_storage_error: true,
                ..defaults
            },
            cpu_steering: args.cpu_steering,
            cluster: cluster_options(&args.etcd, etcd_password)?,
        };
        if let Some(seconds) = args.etcd_lease_ttl {
            let Some(cluster) = data.cluster.as_mut() else {
                return Err(ConfigError("--etcd-lease-ttl needs --etcd and --cluster".into()).into());
            };
            if !(2..=300).contains(&seconds) {
                return Err(ConfigError(format!(
                    "--etcd-lease-ttl {seconds} is out of range: use 2..=300 seconds (shorter leases than 2 s expire on an etcd hiccup, longer ones keep a dead node's shards claimed)"
                ))
                .into());
            }
            cluster.lease_ttl = Duration::from_secs(seconds);
        }
        if data.cluster.is_some() && (data.create || data.partition.is_some()) {
            return Err(ConfigError(
                "--etcd cannot go with --create, --node or --nodes: a cluster has no fixed partition, and a node's \
                 state is made once with `tradeid init --etcd URLS --cluster NAME`"
                    .into(),
            )
            .into());
        }
        let control = control::Config {
            admin: args.admin,
            max_batch: args.max_batch,
            max_waste_per_restart: data
                .max_waste_per_restart(usize::from(args.admin.is_some()) + usize::from(args.grpc.is_some())),
            watchdog,
            grpc: args.grpc,
            policy: data.policy.clone(),
        };
        Ok(ServeConfig { data, control })
    }
}

/// The cluster to join, from the etcd flags (`None` without `--etcd`).
/// The password comes from `--etcd-password-file` or, failing that, from
/// `password_env` (`TRADEID_ETCD_PASSWORD`): never from a flag.
pub(crate) fn cluster_options(
    args: &EtcdArgs,
    password_env: Option<String>,
) -> anyhow::Result<Option<cluster::Options>> {
    let Some(name) = &args.cluster else { return Ok(None) };
    if args.endpoints.is_empty() {
        return Ok(None);
    }
    tradeid::state::check_cluster_name(name).map_err(|e| ConfigError(format!("--cluster: {e}")))?;
    for endpoint in &args.endpoints {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(ConfigError(format!(
                "--etcd {endpoint:?} needs a scheme: http://HOST:PORT, or https://HOST:PORT with --etcd-ca"
            ))
            .into());
        }
    }
    let user = match &args.etcd_user {
        None => None,
        Some(user) => {
            let password = match &args.etcd_password_file {
                Some(file) => std::fs::read_to_string(file)
                    .map_err(|e| ConfigError(format!("cannot read --etcd-password-file {}: {e}", file.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                None => password_env.ok_or_else(|| {
                    ConfigError(format!(
                        "--etcd-user {user} needs a password: put it in a file given with --etcd-password-file, or in TRADEID_ETCD_PASSWORD (never on the command line)"
                    ))
                })?,
            };
            Some((user.clone(), password))
        }
    };
    Ok(Some(cluster::Options {
        endpoints: args.endpoints.clone(),
        name: name.clone(),
        ca: args.etcd_ca.clone(),
        identity: args.etcd_cert.clone().zip(args.etcd_key.clone()),
        user,
        lease_ttl: cluster::DEFAULT_LEASE_TTL,
    }))
}

/// The most workers one server runs: far more than any CPU count it would
/// help, and a bound on the IDs a restart can skip.
pub(crate) const MAX_WORKERS: usize = 256;

/// Parses "0,2,4-7" into CPU numbers.
fn parse_cpu_list(list: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError(format!("--cpus {list:?} is not a CPU list; use a form like \"0,1\" or \"0-3\""));
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b > 4095 {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// Parses "1000/s" (or a bare number) into requests per second.
fn parse_rate(text: &str) -> Result<u32, ConfigError> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    number.trim().parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
        ConfigError(format!("--rate-limit {text:?} is not a rate; use requests per second like \"1000/s\""))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2,4-6").unwrap(), vec![0, 2, 4, 5, 6]);
        assert!(parse_cpu_list("3-1").unwrap_err().0.contains("--cpus"));
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1000/s").unwrap(), 1000);
        assert_eq!(parse_rate("5").unwrap(), 5);
        assert!(parse_rate("0/s").unwrap_err().0.contains("--rate-limit"));
        assert!(parse_rate("fast").is_err());
    }
}
