//! Copying a scheduler's state from one store to another: a one-box
//! install's SQLite file into the PostgreSQL database a cluster of
//! schedulers will share (`kiln store copy`).
//!
//! Everything the scheduler keeps is copied: nodes and their instances,
//! provisions, account limits, revocations (with their times), node
//! certificate holders and bootstrap tokens (used or not). Function
//! environments are opened with the source's key and sealed again with
//! the target's as they are written. A target that already holds state is
//! refused: copying never merges two schedulers' views of the cluster.

use super::{SchedulerStore, SchedulerStoreError, TrustStore};
use crate::placement::Change;

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    pub nodes: usize,
    pub instances: usize,
    pub provisions: usize,
    pub account_limits: usize,
    pub revoked_nodes: usize,
    pub node_holders: usize,
    pub bootstrap_tokens: usize,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nodes, {} instances, {} provisions, {} account limits, {} revoked nodes, \
             {} node certificate holders, {} bootstrap tokens",
            self.nodes,
            self.instances,
            self.provisions,
            self.account_limits,
            self.revoked_nodes,
            self.node_holders,
            self.bootstrap_tokens
        )
    }
}

/// Why a copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read the source store")]
    Source(#[source] SchedulerStoreError),
    #[error("cannot write the target store")]
    Target(#[source] SchedulerStoreError),
    #[error(
        "the target already holds scheduler state ({0}); copy into an empty database, or drop \
         the scheduler's tables there first"
    )]
    NotEmpty(Copied),
}

/// Everything `store` holds, counted.
fn count<S: SchedulerStore + TrustStore + ?Sized>(
    store: &S,
) -> Result<Copied, SchedulerStoreError> {
    let (nodes, instances) = store.load()?;
    Ok(Copied {
        nodes: nodes.len(),
        instances: instances.len(),
        provisions: store.load_provisions()?.len(),
        account_limits: store.load_account_limits()?.len(),
        revoked_nodes: store.revoked_nodes()?.len(),
        node_holders: store.node_holders()?.len(),
        bootstrap_tokens: store.bootstrap_tokens()?.len(),
    })
}

/// Copy everything from `from` into the empty `to`.
pub fn copy<F, T>(from: &F, to: &T) -> Result<Copied, CopyError>
where
    F: SchedulerStore + TrustStore + ?Sized,
    T: SchedulerStore + TrustStore + ?Sized,
{
    let there = count(to).map_err(CopyError::Target)?;
    if there != Copied::default() {
        return Err(CopyError::NotEmpty(there));
    }
    let (nodes, instances) = from.load().map_err(CopyError::Source)?;
    let provisions = from.load_provisions().map_err(CopyError::Source)?;
    let limits = from.load_account_limits().map_err(CopyError::Source)?;
    let revoked = from.revoked_nodes().map_err(CopyError::Source)?;
    let holders = from.node_holders().map_err(CopyError::Source)?;
    let tokens = from.bootstrap_tokens().map_err(CopyError::Source)?;
    let copied = Copied {
        nodes: nodes.len(),
        instances: instances.len(),
        provisions: provisions.len(),
        account_limits: limits.len(),
        revoked_nodes: revoked.len(),
        node_holders: holders.len(),
        bootstrap_tokens: tokens.len(),
    };
    // Nodes before their instances (a foreign key); all in one
    // transaction.
    let changes: Vec<Change> = nodes
        .into_iter()
        .map(Change::UpsertNode)
        .chain(instances.into_iter().map(Change::UpsertInstance))
        .chain(provisions.into_iter().map(Change::UpsertProvision))
        .chain(
            limits
                .into_iter()
                .map(|(a, l)| Change::UpsertAccountLimits(a, l)),
        )
        .collect();
    to.apply(&changes).map_err(CopyError::Target)?;
    for (node, at) in &revoked {
        to.revoke_node(node, *at).map_err(CopyError::Target)?;
    }
    for (node, sha) in &holders {
        to.set_node_holder(node, sha).map_err(CopyError::Target)?;
    }
    for t in &tokens {
        to.restore_bootstrap_token(t).map_err(CopyError::Target)?;
    }
    Ok(copied)
}
