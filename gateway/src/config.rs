//! The config file the operator mounts (`/etc/kubechat/gateway.json`, from
//! the gateway ConfigMap): its types are `kubechat_config`'s, shared with the
//! operator that writes it. Here: what the gateway makes of it.

pub use kubechat_config::GatewayConfig;

use crate::chat::ChatConfig;
use crate::protocol::Limits;

/// The chat settings a clustered gateway runs with.
pub fn chat_config(chat: &kubechat_config::Chat) -> ChatConfig {
    ChatConfig {
        limits: Limits {
            max_message_chars: chat.max_message_chars,
            max_group_members: chat.max_group_members,
            ..Limits::default()
        },
        heartbeat_seconds: chat.heartbeat_seconds,
        offline_after: chat.offline_after(),
        presence_fanout_max_members: chat.presence_fanout_max_members,
        // Many gateways share one store: refuse what it cannot take in time.
        store_admission: Some(crate::chat::admission::AdmissionConfig::default()),
        ..ChatConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::transport::drain::DrainParams;

    /// The example in docs/admin.md ("The config file") is a config this
    /// gateway reads, with the values it shows. (That it reads what the
    /// operator writes today is checked on the operator's own output, in
    /// `e2e/tests/config_contract.rs`.)
    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("../../docs/admin.md");
        let section = doc.split("## The config file").nth(1).expect("docs/admin.md has a config file section");
        let example = section.split("```json").nth(1).and_then(|rest| rest.split("```").next());
        let config: GatewayConfig =
            serde_json::from_str(example.expect("a JSON example in that section")).expect("the example parses");
        assert_eq!((config.listen.websocket, config.listen.admin), (8080, 9090));
        assert_eq!(config.chat.send_retry_window(), Duration::from_secs(3600));
        assert_eq!(config.admin.token_file, Some(PathBuf::from("/var/run/kubechat/admin/token")));
        let chat = chat_config(&config.chat);
        assert_eq!(chat.limits.max_message_chars, config.chat.max_message_chars);
        assert_eq!(chat.offline_after, config.chat.offline_after());
        assert!(chat.store_admission.is_some(), "clustered gateways refuse what the store cannot take");
    }

    #[test]
    fn drain_settings_become_drain_params() {
        let params = DrainParams::from(&kubechat_config::Drain { window_seconds: 0, max_reconnects_per_second: 0 });
        assert_eq!(params, DrainParams { deadline: Duration::from_secs(1), max_reconnects_per_second: 1 });
        assert_eq!(DrainParams::default().deadline, Duration::from_secs(60));
    }
}
