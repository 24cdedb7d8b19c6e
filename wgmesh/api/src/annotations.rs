//! Node annotation keys. The prefix carries the schema version (`v1.`), so a later incompatible schema
//! can be published next to this one while agents of both versions run (k3s learned this the hard way
//! when its backend-data annotation changed shape).

/// Prefix of every annotation wgmesh writes or reads.
pub const ANNOTATION_PREFIX: &str = "v1.wgmesh.io/";
/// The node's WireGuard public key, standard base64 (44 characters), as `wg` prints it.
pub const ANNOTATION_PUBLIC_KEY: &str = "v1.wgmesh.io/public-key";
/// The UDP port the node's WireGuard device listens on.
pub const ANNOTATION_LISTEN_PORT: &str = "v1.wgmesh.io/listen-port";
/// Monotonic key generation: 1 for the first key, +1 on every rotation.
pub const ANNOTATION_KEY_GENERATION: &str = "v1.wgmesh.io/key-generation";
/// RFC 3339 time the current key was created.
pub const ANNOTATION_KEY_CREATED: &str = "v1.wgmesh.io/key-created";
/// Set by `wgmeshctl rotate` to ask the node's agent for a new key: the requested generation.
pub const ANNOTATION_ROTATE_REQUEST: &str = "v1.wgmesh.io/rotate-request";

/// Published by the agent while it rotates: JSON with generation, state (`in-progress`, `complete`,
/// `failed`), start time, peers confirmed and pending.
pub const ANNOTATION_ROTATION_STATUS: &str = "v1.wgmesh.io/rotation-status";

/// The node's own addresses (comma-separated, each one of its InternalIPs) from which it sends
/// host traffic to other nodes' pods through the tunnel, and which it accepts as its own through
/// the tunnel. Present only while the node's agent runs with host encryption; two nodes encrypt
/// host traffic between them only when both publish it.
pub const ANNOTATION_HOST_ADDRESSES: &str = "v1.wgmesh.io/host-addresses";

/// Every annotation the agent owns on its own Node (it publishes exactly these).
pub const AGENT_OWNED: [&str; 5] = [
    ANNOTATION_PUBLIC_KEY,
    ANNOTATION_LISTEN_PORT,
    ANNOTATION_KEY_GENERATION,
    ANNOTATION_KEY_CREATED,
    ANNOTATION_HOST_ADDRESSES,
];
