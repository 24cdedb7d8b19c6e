//! Wire types shared by the agent and wgmeshctl.
