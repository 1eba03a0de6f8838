//! Routes every vault call to the fleet's leader: finds it, follows "not the leader"
//! hints, retries across members with backoff until a deadline, and answers
//! "unavailable" when no majority serves. It never answers success on its own: every
//! success is a leader's answer after its commit.

use bkv_core::auth::{AuthError, TokenVerifier};
use bkv_core::v1::{
    self, admin_client::AdminClient, vault_client::VaultClient, vault_server::Vault, Reason,
};
use bkv_core::wan::{WanProfile, FRONTEND_DC};
use bkv_core::{error_status, MAX_MESSAGE_BYTES};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// One datacenter's node as the frontend reaches it.
#[derive(Clone)]
struct Node {
    dc: String,
    url: String,
    vault: VaultClient<Channel>,
    admin: AdminClient<Channel>,
}

/// Routing policy.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    /// How long a call may keep looking for a serving leader.
    pub deadline: Duration,
    /// First pause between attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
    /// Simulated wide-area latency (client to frontend, frontend to nodes).
    pub wan: Option<WanProfile>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(800),
            wan: None,
        }
    }
}

/// The client-facing vault: checks account tokens and forwards to the leader.
pub struct FleetRouter {
    nodes: Vec<Node>,
    leader: AtomicUsize,
    verifier: Arc<TokenVerifier>,
    config: RouterConfig,
    /// Older fleets (recover-only), newest first: a user not found here is looked for there.
    previous: Vec<FleetRouter>,
    /// The validation bundle every session-opening answer carries.
    bundle: Option<BundleFile>,
    /// Per-account rate limits, checked once per client call.
    limiter: Option<crate::ratelimit::AccountLimiter>,
    /// During a rotation: which fleet (0 this one, i + 1 `previous[i]`) made each pending
    /// login, so that its KE3 goes there and nowhere else.
    logins: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (usize, Instant)>>,
}

/// Logins remembered at once during a rotation; older ones are forgotten first.
const MAX_ROUTED_LOGINS: usize = 100_000;

/// How long a login is remembered (longer than any HSM's login deadline).
const LOGIN_ROUTE_TTL: Duration = Duration::from_secs(600);

/// The bundle file the operator publishes (`bkv fleet publish`), re-read when it changes.
struct BundleFile {
    path: std::path::PathBuf,
    cache: std::sync::Mutex<BundleCache>,
}

#[derive(Default)]
struct BundleCache {
    checked: Option<Instant>,
    modified: Option<std::time::SystemTime>,
    bytes: Arc<Vec<u8>>,
}

impl BundleFile {
    /// The current bundle's bytes (empty if the file is missing or unreadable); the file
    /// is looked at no more than once a second.
    fn current(&self) -> Arc<Vec<u8>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache
            .checked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return cache.bytes.clone();
        }
        cache.checked = Some(Instant::now());
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified != cache.modified || modified.is_none() {
            cache.modified = modified;
            cache.bytes = Arc::new(match std::fs::read(&self.path) {
                Ok(bytes) if bytes.len() <= bkv_core::bundle::MAX_BUNDLE_BYTES => bytes,
                Ok(_) => {
                    tracing::error!(path = %self.path.display(), "bundle file too large; serving none");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            });
        }
        cache.bytes.clone()
    }
}

fn auth_status(error: AuthError) -> Status {
    error_status(
        Code::Unauthenticated,
        Reason::Unauthenticated,
        0,
        error.to_string(),
    )
}

/// A verified `authorization` header, as forwarded to the nodes (which check it again).
type Authorization = MetadataValue<tonic::metadata::Ascii>;

/// Why a router could not be built.
#[derive(Debug, thiserror::Error)]
#[error("invalid node address {url}: {source}")]
pub struct RouterError {
    url: String,
    source: tonic::transport::Error,
}

impl FleetRouter {
    /// A router over `nodes` (datacenter, URL), checking tokens with `verifier`.
    pub fn new(
        nodes: &[(String, String)],
        verifier: Arc<TokenVerifier>,
        config: RouterConfig,
    ) -> Result<Self, RouterError> {
        let nodes = nodes
            .iter()
            .map(|(dc, url)| {
                let channel = Endpoint::from_shared(url.clone())
                    .map_err(|source| RouterError {
                        url: url.clone(),
                        source,
                    })?
                    .connect_timeout(Duration::from_millis(500))
                    // A paused member must not hold a call for the whole deadline.
                    .timeout(Duration::from_secs(3))
                    .connect_lazy();
                Ok(Node {
                    dc: dc.clone(),
                    url: url.clone(),
                    vault: VaultClient::new(channel.clone())
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    admin: AdminClient::new(channel),
                })
            })
            .collect::<Result<_, RouterError>>()?;
        Ok(Self {
            nodes,
            leader: AtomicUsize::new(0),
            verifier,
            config,
            previous: Vec::new(),
            bundle: None,
            limiter: None,
            logins: Default::default(),
        })
    }

    /// Limits the calls per account as `limit` says.
    pub fn with_rate_limit(mut self, limit: crate::ratelimit::RateLimit) -> Self {
        self.limiter = crate::ratelimit::AccountLimiter::new(limit);
        self
    }

    /// Verifies the call's account token, once per client call, and refuses the call if
    /// its account has used up its rate (nothing is forwarded). Returns the header to
    /// forward.
    fn admit<T>(&self, request: &Request<T>, spends_guess: bool) -> Result<Authorization, Status> {
        let (authorization, account) = self.authorization(request)?;
        let Some(limiter) = &self.limiter else {
            return Ok(authorization);
        };
        limiter
            .admit(&account, spends_guess, Instant::now())
            .map_err(|wait| {
                tracing::debug!(%account, "rate limited");
                error_status(
                    Code::ResourceExhausted,
                    Reason::RateLimited,
                    0,
                    format!(
                        "too many calls for this account; nothing was done; retry in {} ms",
                        wait.as_millis().max(1)
                    ),
                )
            })?;
        Ok(authorization)
    }

    /// Adds older, recover-only fleets (newest first): users not found in this fleet are
    /// looked for there, so that clients can move them here.
    pub fn with_previous(mut self, previous: Vec<FleetRouter>) -> Self {
        self.previous = previous;
        self
    }

    /// Serves the validation bundle kept at `path` with every session-opening answer.
    pub fn with_bundle(mut self, path: std::path::PathBuf) -> Self {
        self.bundle = Some(BundleFile {
            path,
            cache: Default::default(),
        });
        self
    }

    fn current_bundle(&self) -> Vec<u8> {
        self.bundle
            .as_ref()
            .map(|b| b.current().as_ref().clone())
            .unwrap_or_default()
    }

    /// Forwards to this fleet, then to each older fleet while the answer says the user
    /// or the login is not there (`not_here`).
    async fn across_fleets<Req, Resp, F, Fut>(
        &self,
        authorization: &Authorization,
        body: Req,
        call: F,
        not_here: impl Fn(&Result<Response<Resp>, Status>) -> bool,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(VaultClient<Channel>, Request<Req>) -> Fut + Clone,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.across_fleets_from(authorization, body, call, not_here)
            .await
            .1
    }

    /// [`Self::across_fleets`], saying which fleet answered (0 this one, i + 1 `previous[i]`).
    async fn across_fleets_from<Req, Resp, F, Fut>(
        &self,
        authorization: &Authorization,
        body: Req,
        call: F,
        not_here: impl Fn(&Result<Response<Resp>, Status>) -> bool,
    ) -> (usize, Result<Response<Resp>, Status>)
    where
        Req: Clone,
        F: Fn(VaultClient<Channel>, Request<Req>) -> Fut + Clone,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        if self.previous.is_empty() {
            return (0, self.forward(authorization, body, call).await);
        }
        let first = self
            .forward(authorization, body.clone(), call.clone())
            .await;
        if !not_here(&first) {
            return (0, first);
        }
        for (i, fleet) in self.previous.iter().enumerate() {
            let answer = fleet
                .forward(authorization, body.clone(), call.clone())
                .await;
            if !not_here(&answer) {
                return (i + 1, answer);
            }
        }
        (0, first)
    }

    /// Remembers which fleet made `login_id` (only while older fleets are routed to).
    fn remember_login(&self, login_id: &[u8], fleet: usize) {
        if self.previous.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        if logins.len() >= MAX_ROUTED_LOGINS {
            logins.retain(|_, (_, at)| now.duration_since(*at) < LOGIN_ROUTE_TTL);
            if logins.len() >= MAX_ROUTED_LOGINS {
                // Forgotten logins fall back to asking each fleet in turn.
                logins.clear();
            }
        }
        logins.insert(login_id.to_vec(), (fleet, now));
    }

    /// Sends a call that continues `login_id` to the fleet that made it, if known; else
    /// asks each fleet in turn.
    async fn to_login_fleet<Req, Resp, F, Fut>(
        &self,
        login_id: &[u8],
        authorization: &Authorization,
        body: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(VaultClient<Channel>, Request<Req>) -> Fut + Clone,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let known = self
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(login_id)
            .map(|(fleet, _)| *fleet);
        match known {
            Some(0) => self.forward(authorization, body, call).await,
            Some(i) if i <= self.previous.len() => {
                self.previous[i - 1]
                    .forward(authorization, body, call)
                    .await
            }
            _ => {
                self.across_fleets(authorization, body, call, |a| {
                    reason_is(a, Reason::LoginUnknown)
                })
                .await
            }
        }
    }

    /// The call's `authorization` header and the account its token names, once verified.
    fn authorization<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(Authorization, bkv_core::AccountId), Status> {
        let value = request
            .metadata()
            .get("authorization")
            .cloned()
            .ok_or(AuthError::Missing)
            .map_err(auth_status)?;
        // Checked here to refuse early; each node checks it again.
        let header = value
            .to_str()
            .map_err(|_| auth_status(AuthError::Malformed))?;
        let account = self
            .verifier
            .verify_header(Some(header))
            .map_err(auth_status)?;
        Ok((value, account))
    }

    fn index_of(&self, dc: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.dc == dc)
    }

    async fn delay(&self, millis: impl Fn(&WanProfile) -> u64) {
        if let Some(wan) = &self.config.wan {
            tokio::time::sleep(Duration::from_millis(millis(wan))).await;
        }
    }

    /// Sends `body` to the leader, following hints and retrying until the deadline; with a
    /// latency profile, the client's distance is added both ways.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        authorization: &Authorization,
        body: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(VaultClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.delay(|w| w.client_ms()).await;
        let answer = self.forward_to_leader(authorization, body, call).await;
        self.delay(|w| w.client_ms()).await;
        answer
    }

    async fn forward_to_leader<Req, Resp, F, Fut>(
        &self,
        authorization: &Authorization,
        body: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(VaultClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let started = Instant::now();
        let mut backoff = self.config.initial_backoff;
        let mut target = self.leader.load(Ordering::Relaxed) % self.nodes.len();
        loop {
            let mut attempt = Request::new(body.clone());
            attempt
                .metadata_mut()
                .insert("authorization", authorization.clone());
            let node = &self.nodes[target];
            self.delay(|w| w.one_way_ms(FRONTEND_DC, &node.dc)).await;
            let answer = call(node.vault.clone(), attempt).await;
            self.delay(|w| w.one_way_ms(&node.dc, FRONTEND_DC)).await;
            let status = match answer {
                Ok(response) => {
                    self.leader.store(target, Ordering::Relaxed);
                    return Ok(response);
                }
                Err(status) => status,
            };
            let detail = bkv_core::error_detail(&status);
            let reason = detail
                .as_ref()
                .and_then(|d| Reason::try_from(d.reason).ok());
            let next = match (reason, &detail) {
                (Some(Reason::NotLeader), Some(d)) if !d.leader_dc.is_empty() => {
                    self.index_of(&d.leader_dc).filter(|i| *i != target)
                }
                (Some(Reason::NotLeader | Reason::Unavailable), _) => None,
                // No detail: the node could not be reached at all.
                (None, _)
                    if matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                    ) =>
                {
                    None
                }
                // Any other answer is the vault's real answer.
                _ => return Err(status),
            };
            tracing::debug!(dc = %node.dc, error = %status.message(), "retrying at another member");
            if started.elapsed() >= self.config.deadline {
                return Err(error_status(
                    Code::Unavailable,
                    Reason::Unavailable,
                    0,
                    "no majority of the fleet is reachable; nothing was changed by this call",
                ));
            }
            match next {
                Some(hinted) => target = hinted,
                None => {
                    target = (target + 1) % self.nodes.len();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Every node's report, and the fleet's health as the leader's membership defines it.
    pub async fn fleet_status(&self) -> v1::FleetStatusResponse {
        let reports = futures::future::join_all(self.nodes.iter().map(|node| async move {
            let mut admin = node.admin.clone();
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                admin.node_status(v1::NodeStatusRequest {}),
            )
            .await;
            let (status, error) = match answer {
                Ok(Ok(status)) => (Some(status.into_inner()), String::new()),
                Ok(Err(e)) => (None, e.message().to_string()),
                Err(_) => (None, "no answer within 2 s".to_string()),
            };
            v1::NodeHealth {
                dc: node.dc.clone(),
                url: node.url.clone(),
                reachable: status.is_some(),
                status,
                error,
            }
        }))
        .await;
        let leader = reports
            .iter()
            .filter_map(|r| r.status.as_ref())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .cloned();
        let mut response = v1::FleetStatusResponse {
            nodes: reports,
            ..Default::default()
        };
        if let Some(leader) = leader {
            let voters: Vec<&v1::MemberInfo> = leader.members.iter().filter(|m| m.voter).collect();
            let live_voters = voters
                .iter()
                .filter(|m| {
                    response
                        .nodes
                        .iter()
                        .any(|n| n.status.as_ref().is_some_and(|s| s.node_id == m.node_id))
                })
                .count();
            response.majority = !voters.is_empty() && live_voters > voters.len() / 2;
            response.leader_dc = leader.dc.clone();
            response.term = leader.term;
            response.commit_index = leader.applied_index;
            response.fleet_key = leader.fleet_key.clone();
            response.members = leader.members.clone();
        }
        response
    }
}

fn reason_is(answer: &Result<impl Sized, Status>, reason: Reason) -> bool {
    match answer {
        Ok(_) => false,
        Err(status) => bkv_core::error_detail(status)
            .and_then(|d| Reason::try_from(d.reason).ok())
            .is_some_and(|r| r == reason),
    }
}

#[tonic::async_trait]
impl Vault for FleetRouter {
    async fn enroll_start(
        &self,
        request: Request<v1::EnrollStartRequest>,
    ) -> Result<Response<v1::EnrollStartResponse>, Status> {
        let authorization = self.admit(&request, false)?;
        let mut answer = self
            .forward(
                &authorization,
                request.into_inner(),
                |mut c, r| async move { c.enroll_start(r).await },
            )
            .await?;
        answer.get_mut().bundle = self.current_bundle();
        Ok(answer)
    }

    async fn enroll_finish(
        &self,
        request: Request<v1::EnrollFinishRequest>,
    ) -> Result<Response<v1::EnrollFinishResponse>, Status> {
        let authorization = self.admit(&request, false)?;
        self.forward(
            &authorization,
            request.into_inner(),
            |mut c, r| async move { c.enroll_finish(r).await },
        )
        .await
    }

    async fn recover_start(
        &self,
        request: Request<v1::RecoverStartRequest>,
    ) -> Result<Response<v1::RecoverStartResponse>, Status> {
        let authorization = self.admit(&request, true)?;
        let (fleet, answer) = self
            .across_fleets_from(
                &authorization,
                request.into_inner(),
                |mut c, r| async move { c.recover_start(r).await },
                |a| reason_is(a, Reason::NotEnrolled),
            )
            .await;
        let mut answer = answer?;
        self.remember_login(&answer.get_ref().login_id, fleet);
        answer.get_mut().bundle = self.current_bundle();
        Ok(answer)
    }

    async fn recover_finish(
        &self,
        request: Request<v1::RecoverFinishRequest>,
    ) -> Result<Response<v1::RecoverFinishResponse>, Status> {
        let authorization = self.admit(&request, false)?;
        let body = request.into_inner();
        self.to_login_fleet(
            &body.login_id.clone(),
            &authorization,
            body,
            |mut c, r| async move { c.recover_finish(r).await },
        )
        .await
    }

    async fn recover_abort(
        &self,
        request: Request<v1::RecoverAbortRequest>,
    ) -> Result<Response<v1::RecoverAbortResponse>, Status> {
        let authorization = self.admit(&request, false)?;
        let body = request.into_inner();
        self.to_login_fleet(
            &body.login_id.clone(),
            &authorization,
            body,
            |mut c, r| async move { c.recover_abort(r).await },
        )
        .await
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let authorization = self.admit(&request, false)?;
        let mut answer = self
            .across_fleets(
                &authorization,
                request.into_inner(),
                |mut c, r| async move { c.status(r).await },
                |a| {
                    a.as_ref()
                        .is_ok_and(|r| r.get_ref().state == v1::RecordState::NotEnrolled as i32)
                },
            )
            .await?;
        answer.get_mut().bundle = self.current_bundle();
        Ok(answer)
    }

    async fn retire(
        &self,
        request: Request<v1::RetireRequest>,
    ) -> Result<Response<v1::RetireResponse>, Status> {
        let authorization = self.admit(&request, false)?;
        self.across_fleets(
            &authorization,
            request.into_inner(),
            |mut c, r| async move { c.retire(r).await },
            |a| reason_is(a, Reason::LoginUnknown) || reason_is(a, Reason::NotEnrolled),
        )
        .await
    }

    async fn bundle(
        &self,
        _request: Request<v1::BundleRequest>,
    ) -> Result<Response<v1::BundleResponse>, Status> {
        Ok(Response::new(v1::BundleResponse {
            bundle: self.current_bundle(),
        }))
    }

    async fn fleet_status(
        &self,
        _request: Request<v1::FleetStatusRequest>,
    ) -> Result<Response<v1::FleetStatusResponse>, Status> {
        Ok(Response::new(self.fleet_status().await))
    }
}
