//! The names the isolation gives to what it creates, all carrying the
//! agent's prefix, so that everything carrying it is the agent's to remove.

#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    pub fn table(&self) -> &str {
        &self.prefix
    }
    /// Every instance interface: `<prefix>-<hex>`.
    pub fn instance_wildcard(&self) -> String {
        format!("{}-*", self.prefix)
    }
    pub fn vpc_wildcard(&self) -> String {
        format!("{}v*", self.prefix)
    }
    pub fn egress_chain(&self, iface: &str) -> String {
        format!("e-{iface}")
    }
    pub fn ingress_chain(&self, iface: &str) -> String {
        format!("i-{iface}")
    }
    pub fn bridge(&self, vpc_index: usize) -> String {
        format!("{}v{vpc_index}", self.prefix)
    }
    pub fn gateway(&self, vpc_index: usize) -> String {
        format!("{}v{vpc_index}g", self.prefix)
    }
    pub fn ovs_port(&self, vpc_index: usize) -> String {
        format!("{}v{vpc_index}o", self.prefix)
    }
    /// The ifb of an instance interface `<prefix>-<hex>`: `<prefix>i<hex>`.
    pub fn ifb(&self, iface: &str) -> Option<String> {
        let hex = iface.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| format!("{}i{hex}", self.prefix))
    }
    /// Whether `name` is a bridge, gateway, OVS port or ifb of ours.
    pub fn is_own_aux(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(&self.prefix) else {
            return false;
        };
        if let Some(hex) = rest.strip_prefix('i') {
            return !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
        }
        let Some(rest) = rest.strip_prefix('v') else {
            return false;
        };
        let digits = rest.trim_end_matches(['g', 'o']);
        !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && rest.len() <= digits.len() + 1
    }
}
