//! Carries the HSM's sealed peer messages over gRPC. Untrusted: it only moves bytes.

use bkv_core::v1::{peer_client::PeerClient, PeerMessage};
use bkv_core::wan::WanProfile;
use bkv_core::MAX_PEER_MESSAGE_BYTES;
use bkv_hsm::fleet::BoxFuture;
use bkv_hsm::{PeerTransport, TransportError};
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// One lazily connected gRPC channel per peer datacenter.
pub struct GrpcTransport {
    peers: HashMap<String, PeerClient<Channel>>,
    my_dc: String,
    wan: Option<WanProfile>,
}

/// A lazily connected client for `url` with the timeouts peers use.
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .connect_lazy())
}

impl GrpcTransport {
    /// Builds clients for every `(dc, url)`; with a `wan` profile, each message waits the
    /// profile's one-way delay from `my_dc` to its peer, and each answer the way back.
    pub fn new(
        peers: &[(String, String)],
        my_dc: &str,
        wan: Option<WanProfile>,
    ) -> Result<Self, tonic::transport::Error> {
        let mut map = HashMap::new();
        for (dc, url) in peers {
            let client = PeerClient::new(channel(url)?)
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
            map.insert(dc.clone(), client);
        }
        Ok(Self {
            peers: map,
            my_dc: my_dc.to_string(),
            wan,
        })
    }

    /// The client for `dc`.
    pub fn client(&self, dc: &str) -> Option<PeerClient<Channel>> {
        self.peers.get(dc).cloned()
    }
}

impl PeerTransport for GrpcTransport {
    fn call(&self, dc: &str, message: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        let client = self.client(dc);
        let delays = self
            .wan
            .map(|w| (w.one_way_ms(&self.my_dc, dc), w.one_way_ms(dc, &self.my_dc)));
        let dc = dc.to_string();
        Box::pin(async move {
            let mut client =
                client.ok_or_else(|| TransportError(format!("no address for {dc}")))?;
            if let Some((there, _)) = delays {
                tokio::time::sleep(Duration::from_millis(there)).await;
            }
            let answer = client
                .raft(PeerMessage { sealed: message })
                .await
                .map_err(|s| TransportError(format!("{dc}: {}", s.message())))?;
            if let Some((_, back)) = delays {
                tokio::time::sleep(Duration::from_millis(back)).await;
            }
            Ok(answer.into_inner().sealed)
        })
    }
}
