//! A pool of ready network namespaces so that a cold start does not pay for
//! creating one. Slots are handed out once and deleted when released: a
//! namespace a function has run in is never reused.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::netns::{NetworkError, NetworkOps};
use super::subnet::{Ipv4Cidr, NetSlot};

#[derive(Debug, Default)]
struct PoolState {
    /// Indices handed out or pooled (or whose deletion failed).
    used: BTreeSet<u32>,
    /// Where the round-robin search for a free index starts, so a just-freed
    /// name is not reused at once.
    next: u32,
    ready: VecDeque<NetSlot>,
}

pub struct NetPool {
    ops: Arc<dyn NetworkOps>,
    prefix: String,
    subnet: Ipv4Cidr,
    target: usize,
    state: Mutex<PoolState>,
    wake: Arc<Notify>,
}

impl Drop for NetPool {
    fn drop(&mut self) {
        // Let the refill task see that the pool is gone.
        self.wake.notify_one();
    }
}

impl NetPool {
    pub fn new(ops: Arc<dyn NetworkOps>, prefix: &str, subnet: Ipv4Cidr, target: usize) -> Self {
        Self {
            ops,
            prefix: prefix.to_owned(),
            subnet,
            target,
            state: Mutex::new(PoolState::default()),
            wake: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().expect("netpool lock")
    }

    fn allocate(&self) -> Result<NetSlot, NetworkError> {
        let slots = self.subnet.slots();
        let mut st = self.lock();
        for step in 0..slots {
            let index = (st.next + step) % slots;
            if st.used.insert(index) {
                st.next = (index + 1) % slots;
                return Ok(NetSlot::new(&self.prefix, &self.subnet, index));
            }
        }
        Err(NetworkError::Exhausted(slots))
    }

    fn free(&self, index: u32) {
        self.lock().used.remove(&index);
    }

    async fn create_one(&self) -> Result<NetSlot, NetworkError> {
        let slot = self.allocate()?;
        match self.ops.create(&slot).await {
            Ok(()) => Ok(slot),
            Err(e) => {
                // `create` undoes itself; the index is free again.
                self.free(slot.index);
                Err(e)
            }
        }
    }

    /// A ready namespace: from the pool when there is one, else made now.
    pub async fn take(&self) -> Result<NetSlot, NetworkError> {
        let pooled = self.lock().ready.pop_front();
        self.wake.notify_one();
        match pooled {
            Some(slot) => Ok(slot),
            None => self.create_one().await,
        }
    }

    /// Delete a namespace that was taken. Its index is reused only once the
    /// deletion succeeded.
    pub async fn release(&self, slot: &NetSlot) -> Result<(), NetworkError> {
        self.release_name(slot.index, &slot.name).await
    }

    pub(crate) async fn release_name(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        self.ops.delete(name).await?;
        self.free(index);
        Ok(())
    }

    /// Top the pool up to its target.
    pub async fn fill(&self) -> Result<(), NetworkError> {
        while self.lock().ready.len() < self.target {
            let slot = self.create_one().await?;
            self.lock().ready.push_back(slot);
        }
        Ok(())
    }

    pub fn ready_len(&self) -> usize {
        self.lock().ready.len()
    }

    /// Keep the pool full in the background until the pool is dropped.
    pub fn spawn_refill(self: &Arc<Self>) -> JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let wake = self.wake.clone();
        tokio::spawn(async move {
            loop {
                let notified = wake.notified();
                {
                    let Some(pool) = weak.upgrade() else { return };
                    if let Err(e) = pool.fill().await {
                        tracing::warn!(error = %kiln_core::error_chain(&e), "cannot refill the network namespace pool");
                    }
                }
                // No strong reference while waiting: dropping the pool
                // wakes this task, which then ends.
                notified.await;
            }
        })
    }

    /// Delete every pooled namespace (driver shutdown).
    pub async fn drain(&self) -> Result<(), NetworkError> {
        loop {
            let slot = self.lock().ready.pop_front();
            let Some(slot) = slot else { return Ok(()) };
            self.release(&slot).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::netns::RecordingNetwork;

    fn pool(target: usize, subnet: &str) -> (Arc<RecordingNetwork>, NetPool) {
        let net = Arc::new(RecordingNetwork::new());
        let p = NetPool::new(net.clone(), "kt", subnet.parse().unwrap(), target);
        (net, p)
    }

    #[tokio::test]
    async fn pooled_slots_are_handed_out_and_never_reused() {
        let (net, p) = pool(2, "10.1.0.0/24");
        p.fill().await.unwrap();
        assert_eq!(p.ready_len(), 2);
        assert_eq!(net.existing().len(), 2);
        let a = p.take().await.unwrap();
        assert_eq!(a.name, "kt-0");
        assert_eq!(p.ready_len(), 1);
        p.release(&a).await.unwrap();
        assert!(!net.existing().contains("kt-0"));
        p.fill().await.unwrap();
        // Round robin: the freed index is not the next one handed out.
        assert!(net.existing().contains("kt-2"));
        p.drain().await.unwrap();
        assert!(net.existing().is_empty());
    }

    #[tokio::test]
    async fn exhaustion_and_failures_free_their_index() {
        let (net, p) = pool(0, "10.1.0.0/28");
        let slots: Vec<_> = [(); 4].iter().map(|_| p.allocate().unwrap()).collect();
        assert!(matches!(p.allocate(), Err(NetworkError::Exhausted(4))));
        p.free(slots[1].index);
        net.fail_creates(true);
        assert!(p.take().await.is_err());
        net.fail_creates(false);
        assert_eq!(p.take().await.unwrap().index, 1);
    }

    #[tokio::test]
    async fn background_refill_tops_up_after_take() {
        let (_net, p) = pool(2, "10.1.0.0/24");
        let p = Arc::new(p);
        let task = p.spawn_refill();
        for _ in 0..100 {
            if p.ready_len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(p.ready_len(), 2);
        let _taken = p.take().await.unwrap();
        for _ in 0..100 {
            if p.ready_len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(p.ready_len(), 2);
        drop(p);
        // The task holds only a weak reference and ends with the pool.
        tokio::time::timeout(std::time::Duration::from_secs(1), task)
            .await
            .expect("refill task ends when the pool is dropped")
            .unwrap();
    }
}
