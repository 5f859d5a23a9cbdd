//! `weft ca`: the mesh CA as a gRPC service (Istio's `IstioCertificateService` on 15012), so node agents
//! (weft's or stock ztunnels) obtain workload certificates without holding the root key.
//!
//! Owns: the `weft ca` flags and their validation ([`CaArgs`] → [`CaConfig`]), startup (root from the
//! Secret, root certificate published to a ConfigMap), the TLS listener with its own serving certificate
//! for the names ztunnel dials, and the gRPC server. Submodules: [`authz`] (who may have which identity),
//! `service` (the RPC), `kube` (Kubernetes reads), `root` (Secret, ConfigMap, serving certificate).
//! Does not own: the X.509-SVID rules and the root itself (`identity::Ca`), the node agent's client
//! (`identity::grpc`), or process setup (`main`).

pub mod authz;
mod kube;
mod publish;
mod root;
mod service;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_proto::IstioCertificateServiceServer;

pub use self::authz::{Authorizer, ClusterLookup, Denied, Grant, LookupError, PodInfo, TokenReviewStatus};
pub use self::kube::KubeLookup;
pub use self::root::{
    CONFIGMAP_ROOT_KEY, CaRoot, SECRET_CERT_KEY, SECRET_KEY_KEY, load_or_create_in_secret, publish_root,
};
pub use self::service::{CaService, Validity};
use crate::config::{DEFAULT_TRUST_DOMAIN, LogFormat, TRUST_DOMAIN_ENV};

/// Environment variable: the CA's own namespace (the Deployment sets it from `metadata.namespace`).
pub const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
pub const DEFAULT_NAMESPACE: &str = "weft-system";
pub const DEFAULT_ROOT_SECRET: &str = "weft-ca-root";
pub const DEFAULT_ROOT_CONFIGMAP: &str = "weft-ca-root-cert";
/// The node agents' ServiceAccount, as TokenReview names it.
pub const DEFAULT_NODE_AGENT: &str = "system:serviceaccount:weft-system:weft-node";
/// The token audience Istio's CA clients (ztunnel, istio-agent) use.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// Names the serving certificate carries: our Service, and the one stock ztunnels dial.
pub const DEFAULT_DNS_NAMES: [&str; 2] = ["weft-ca.weft-system.svc", "istiod.istio-system.svc"];
/// Workload certificate lifetime when the request asks for none (Istio's default).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate handed out (Istio's MAX_WORKLOAD_CERT_TTL).
pub const DEFAULT_MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The serving certificate's lifetime; it is reissued at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const SERVING_RETRY: Duration = Duration::from_secs(60);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the gRPC server to pick them up.
const ACCEPT_QUEUE: usize = 128;

/// `weft ca` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    /// gRPC listener (TLS).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    #[arg(long, env = TRUST_DOMAIN_ENV, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Namespace holding the root Secret and the root-certificate ConfigMap.
    #[arg(long, env = POD_NAMESPACE_ENV, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Secret with the root (`ca-cert.pem`, `ca-key.pem`); created with a new root if absent.
    #[arg(long, default_value = DEFAULT_ROOT_SECRET)]
    pub root_secret: String,
    /// ConfigMap the root certificate is published to (key `root-cert.pem`); empty: do not publish.
    #[arg(long, default_value = DEFAULT_ROOT_CONFIGMAP)]
    pub root_configmap: String,
    /// Node-agent ServiceAccounts (`system:serviceaccount:NS:SA`, or `NS/SA`); repeat for several.
    /// They may obtain identities of pods scheduled on their own node.
    #[arg(long = "node-agent", default_values_t = [DEFAULT_NODE_AGENT.to_owned()])]
    pub node_agents: Vec<String>,
    /// Audiences a caller's token must be valid for (TokenReview `spec.audiences`).
    #[arg(long = "audience", default_values_t = [DEFAULT_AUDIENCE.to_owned()])]
    pub audiences: Vec<String>,
    /// DNS names in the server's TLS certificate; repeat for several.
    #[arg(long = "dns-name", default_values_t = DEFAULT_DNS_NAMES.map(String::from))]
    pub dns_names: Vec<String>,
    /// Workload certificate lifetime, in seconds, when a request asks for none.
    #[arg(long, default_value_t = DEFAULT_CERT_TTL.as_secs())]
    pub cert_ttl_secs: u64,
    /// Longest workload certificate lifetime, in seconds; longer requests are shortened.
    #[arg(long, default_value_t = DEFAULT_MAX_CERT_TTL.as_secs())]
    pub max_cert_ttl_secs: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The validated configuration of `weft ca`.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub namespace: String,
    pub root_secret: String,
    /// `None`: do not publish the root certificate.
    pub root_configmap: Option<String>,
    /// Usernames `system:serviceaccount:NS:SA`.
    pub node_agents: Vec<String>,
    pub audiences: Vec<String>,
    pub dns_names: Vec<String>,
    pub validity: Validity,
    pub log_format: LogFormat,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            root_secret: DEFAULT_ROOT_SECRET.to_owned(),
            root_configmap: Some(DEFAULT_ROOT_CONFIGMAP.to_owned()),
            node_agents: vec![DEFAULT_NODE_AGENT.to_owned()],
            audiences: vec![DEFAULT_AUDIENCE.to_owned()],
            dns_names: DEFAULT_DNS_NAMES.map(String::from).to_vec(),
            validity: Validity { default: DEFAULT_CERT_TTL, max: DEFAULT_MAX_CERT_TTL },
            log_format: LogFormat::Text,
        }
    }
}

impl CaConfig {
    pub fn from_args(a: CaArgs) -> Result<Self, Error> {
        crate::identity::Identity::new(&a.trust_domain, "ns", "sa")
            .validate()
            .map_err(|_| Error::BadTrustDomain(a.trust_domain.clone()))?;
        let node_agents = a
            .node_agents
            .iter()
            .map(|n| normalize_node_agent(n).ok_or_else(|| Error::BadNodeAgent(n.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        if a.dns_names.is_empty()
            || a.dns_names.iter().any(|n| rcgen::string::Ia5String::try_from(n.as_str()).is_err() || n.is_empty())
        {
            return Err(Error::BadDnsNames(a.dns_names));
        }
        if a.cert_ttl_secs < 60 {
            return Err(Error::CertTtlTooShort(a.cert_ttl_secs));
        }
        if a.max_cert_ttl_secs < a.cert_ttl_secs {
            return Err(Error::MaxBelowDefault { default: a.cert_ttl_secs, max: a.max_cert_ttl_secs });
        }
        let names_ok = |s: &str| !s.is_empty() && s.len() <= 253;
        if !names_ok(&a.namespace) || !names_ok(&a.root_secret) {
            return Err(Error::EmptyName);
        }
        Ok(Self {
            listen: a.listen,
            trust_domain: a.trust_domain,
            namespace: a.namespace,
            root_secret: a.root_secret,
            root_configmap: Some(a.root_configmap).filter(|s| !s.is_empty()),
            node_agents,
            audiences: a.audiences.into_iter().filter(|s| !s.is_empty()).collect(),
            dns_names: a.dns_names,
            validity: Validity {
                default: Duration::from_secs(a.cert_ttl_secs),
                max: Duration::from_secs(a.max_cert_ttl_secs),
            },
            log_format: a.log_format,
        })
    }
}

/// `system:serviceaccount:NS:SA` stays; `NS/SA` becomes it.
fn normalize_node_agent(s: &str) -> Option<String> {
    let (ns, sa) = match s.strip_prefix("system:serviceaccount:") {
        Some(rest) => rest.split_once(':')?,
        None => s.split_once('/')?,
    };
    let ok = |p: &str| !p.is_empty() && !p.contains([':', '/']);
    (ok(ns) && ok(sa)).then(|| authz::sa_username(ns, sa))
}

/// What `run` needs besides its configuration: the bound listener (tests bind port 0) and an API client.
pub struct CaOptions {
    pub config: Arc<CaConfig>,
    pub listener: TcpListener,
    pub client: ::kube::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--trust-domain {0:?}: must be a DNS-like name such as cluster.local (lowercase letters, digits, '.', '-', '_')"
    )]
    BadTrustDomain(String),
    #[error("--node-agent {0:?}: expected system:serviceaccount:NAMESPACE:NAME or NAMESPACE/NAME")]
    BadNodeAgent(String),
    #[error("--dns-name {0:?}: give at least one DNS name (ASCII) for the server certificate")]
    BadDnsNames(Vec<String>),
    #[error("--cert-ttl-secs {0}: must be at least 60 seconds so certificates can rotate at half-life")]
    CertTtlTooShort(u64),
    #[error("--max-cert-ttl-secs {max} is below --cert-ttl-secs {default}; raise the maximum or lower the default")]
    MaxBelowDefault { default: u64, max: u64 },
    #[error("--namespace and --root-secret must be non-empty Kubernetes names")]
    EmptyName,
    #[error(
        "could not {action} {what}: {source}; check that the API server is reachable and that the CA's \
         ServiceAccount may get/create Secrets and apply ConfigMaps in its namespace"
    )]
    Kube {
        action: &'static str,
        what: String,
        #[source]
        source: ::kube::Error,
    },
    #[error(
        "Secret {namespace}/{name} does not hold a usable root: {reason}; fix the Secret (keys ca-cert.pem and \
         ca-key.pem, PEM) or delete it to have a new root created (every workload must then get new certificates)"
    )]
    BadRootSecret { namespace: String, name: String, reason: String },
    #[error("the root is unusable: {source}")]
    RootUnusable {
        #[source]
        source: crate::identity::Error,
    },
    #[error("temporary file {path}: {source}; check that the temp directory is writable")]
    TempIo {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not issue the CA server's TLS certificate: {0}")]
    ServingCert(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// `weft ca`: loads (or creates) the root in the Secret, publishes the root certificate (in its own
/// namespace before serving, then in every namespace as they appear), and serves CreateCertificate on
/// `opts.listener` until `shutdown` resolves.
pub async fn run(opts: CaOptions, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let config = opts.config;
    let root =
        load_or_create_in_secret(&opts.client, &config.namespace, &config.root_secret, &config.trust_domain).await?;
    let root = Arc::new(root);
    let stop_publishing = CancellationToken::new();
    let _stop_on_return = stop_publishing.clone().drop_guard();
    if let Some(cm) = &config.root_configmap {
        publish_root(&opts.client, &config.namespace, cm, &root).await?;
        let everywhere =
            publish::publish_in_every_namespace(opts.client.clone(), cm.clone(), root.clone(), stop_publishing.clone());
        tokio::spawn(everywhere);
    }
    let lookup: Arc<dyn ClusterLookup> = Arc::new(KubeLookup::new(opts.client));
    serve(opts.listener, root, lookup, &config, shutdown).await
}

/// Serves CreateCertificate over TLS on `listener` with `root`, deciding with `lookup`, until `shutdown`.
/// The serving certificate is issued by `root` for `config.dns_names` and reissued at half-life.
pub async fn serve(
    listener: TcpListener,
    root: Arc<CaRoot>,
    lookup: Arc<dyn ClusterLookup>,
    config: &CaConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let serving = root::ServingCert::new(root.issue_serving_cert(&config.dns_names, SERVING_CERT_TTL)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(serving.clone());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    tokio::spawn(reissue_serving_cert(root.clone(), serving, config.dns_names.clone(), stop.clone()));

    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPT_QUEUE);
    let local = listener.local_addr().ok();
    tokio::spawn(accept_loop(listener, acceptor, tx, stop.clone()));
    let incoming = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) });

    let authorizer =
        Authorizer::new(lookup, config.trust_domain.clone(), config.node_agents.clone(), config.audiences.clone());
    let service = CaService::new(root.ca().clone(), authorizer, config.validity);
    tracing::info!(addr = ?local, trust_domain = %config.trust_domain, dns_names = ?config.dns_names,
        node_agents = ?config.node_agents, "CA gRPC server listening");
    let signal = async {
        shutdown.await;
        stop.cancel();
    };
    // One service, so no router: tonic serves it directly.
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(IstioCertificateServiceServer::new(service), incoming, signal)
        .await?;
    tracing::info!("CA gRPC server stopped");
    Ok(())
}

type TlsConn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Accepts TCP, handshakes TLS off the accept path (a slow client holds only its own task), and hands
/// finished connections to the gRPC server.
async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: tokio::sync::mpsc::Sender<Result<TlsConn, std::io::Error>>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, tx, stop) = (acceptor.clone(), tx.clone(), stop.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                r = handshake => r,
            };
            match conn {
                Ok(Ok(conn)) => {
                    let _ = tx.send(Ok(conn)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn reissue_serving_cert(
    root: Arc<CaRoot>,
    serving: Arc<root::ServingCert>,
    names: Vec<String>,
    stop: CancellationToken,
) {
    let mut wait = SERVING_CERT_TTL / 2;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match root.issue_serving_cert(&names, SERVING_CERT_TTL) {
            Ok(key) => {
                serving.store(key);
                tracing::info!("reissued the CA server's TLS certificate");
                wait = SERVING_CERT_TTL / 2;
            }
            Err(error) => {
                tracing::error!(%error, retry_in = ?SERVING_RETRY, "could not reissue the CA server's TLS certificate");
                wait = SERVING_RETRY;
            }
        }
    }
}
