//! Turning the desired services into map operations: pure, no syscalls,
//! so the translation is unit-tested without a kernel.
//!
//! The order is Cilium's (`bpf_reconciler.go`), chosen so a connect() never
//! sees a service with zero backends or a slot naming a missing backend:
//! 1. upsert new backends;
//! 2. per changed service, a fresh Maglev table swapped in by one outer-map
//!    insert ([`MapOp::SetTable`]), then the service entry;
//! 3. delete removed services and their tables;
//! 4. delete backends no table references any more. The kernel waits for an
//!    RCU grace period inside the outer-map update, so once step 2 returned
//!    no program can still be reading the old table.

use crate::addr::to_kernel;
use legate_bpf_common::{
    Addr, Service, ServiceKey, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, MODE_DIRECT, MODE_REDIRECT,
    PROTO_TCP,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

/// One service the kernel should balance.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub vip: SocketAddr,
    pub backends: Vec<SocketAddr>,
    /// For each of the [`MAGLEV_SIZE`] slots, an index into `backends`:
    /// the weighted Maglev table the userspace balancer uses too.
    pub table: Arc<[u32]>,
}

/// A VIP whose connects go to Legate's redirect listener on
/// 127.0.0.1:`port` (IPv4 VIPs) or [::1]:`port` (IPv6 VIPs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Redirect {
    pub vip: SocketAddr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MapOp {
    UpsertBackend {
        id: u32,
        addr: Addr,
    },
    /// Build a new inner table of backend ids and swap it in atomically.
    SetTable {
        service: u32,
        slots: Arc<[u32]>,
    },
    UpsertService {
        key: ServiceKey,
        value: Service,
    },
    DeleteService {
        key: ServiceKey,
    },
    DeleteTable {
        service: u32,
    },
    DeleteBackend {
        id: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("service {vip}: the Maglev table has {got} slots, the kernel's has {MAGLEV_SIZE}")]
    TableSize { vip: SocketAddr, got: usize },
    #[error("service {vip}: slot {slot} names backend {index} of {count}")]
    SlotOutOfRange {
        vip: SocketAddr,
        slot: usize,
        index: u32,
        count: usize,
    },
    #[error("service {vip}: backend {backend} is not of the VIP's address family")]
    Family {
        vip: SocketAddr,
        backend: SocketAddr,
    },
    #[error("{0} is both a DIRECT and a REDIRECT service")]
    Conflict(SocketAddr),
    #[error("more than {MAX_SERVICES} services")]
    TooManyServices,
    #[error("more than {MAX_BACKENDS} backends")]
    TooManyBackends,
}

#[derive(Debug, Default)]
struct Ids {
    next: u32,
    free: BTreeSet<u32>,
}

impl Ids {
    fn take(&mut self, max: u32) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn mark_used(&mut self, id: u32) {
        while self.next <= id {
            self.free.insert(self.next);
            self.next += 1;
        }
        self.free.remove(&id);
    }

    fn give_back(&mut self, id: u32) {
        self.free.insert(id);
    }
}

#[derive(Debug)]
struct Programmed {
    id: u32,
    /// Backend address → backend id.
    backends: BTreeMap<Addr, u32>,
    /// Backend id per slot, as last written.
    slots: Arc<[u32]>,
}

/// What the maps hold, as far as this process knows.
#[derive(Debug, Default)]
pub struct State {
    services: BTreeMap<ServiceKey, Programmed>,
    /// REDIRECT services: key → redirect port.
    redirects: BTreeMap<ServiceKey, u16>,
    /// Backend ids found in adopted maps whose owner is not known yet:
    /// deleted after the first plan has given every service fresh tables.
    orphans: BTreeSet<u32>,
    service_ids: Ids,
    backend_ids: Ids,
}

pub fn service_key(vip: SocketAddr) -> ServiceKey {
    ServiceKey {
        addr: to_kernel(vip),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

impl State {
    /// Starts from maps a previous process left pinned: their services keep
    /// their ids (so connects keep working until the first plan swaps new
    /// tables in), and every backend id is reserved until then.
    pub fn restore(services: &[(ServiceKey, Service)], backends: &[u32]) -> Self {
        let mut s = State::default();
        for (key, svc) in services {
            if svc.mode == MODE_REDIRECT {
                // Rewritten by the first plan if still wanted, else deleted.
                s.redirects.insert(*key, 0);
                continue;
            }
            s.service_ids.mark_used(svc.id);
            s.services.insert(
                *key,
                Programmed {
                    id: svc.id,
                    backends: BTreeMap::new(),
                    slots: Arc::from([]),
                },
            );
        }
        for id in backends {
            s.backend_ids.mark_used(*id);
            s.orphans.insert(*id);
        }
        s
    }

    /// The services programmed now: VIP, service id and backend ids.
    pub fn services(&self) -> impl Iterator<Item = (SocketAddr, u32, Vec<(SocketAddr, u32)>)> + '_ {
        self.services.iter().map(|(k, p)| {
            (
                crate::addr::from_kernel(&k.addr),
                p.id,
                p.backends
                    .iter()
                    .map(|(a, id)| (crate::addr::from_kernel(a), *id))
                    .collect(),
            )
        })
    }

    /// Forgets what was written, so the next plan rewrites every service
    /// (after a failed apply left the maps in an unknown state).
    pub fn invalidate(&mut self) {
        for p in self.services.values_mut() {
            p.slots = Arc::from([]);
        }
        for port in self.redirects.values_mut() {
            *port = 0;
        }
    }

    /// The operations that bring the maps from this state to `desired`,
    /// updating the state as if they were applied. A service with no
    /// backends is removed: connects to it then proceed unchanged.
    pub fn plan(
        &mut self,
        desired: &[ServiceSpec],
        redirects: &[Redirect],
    ) -> Result<Vec<MapOp>, PlanError> {
        for spec in desired {
            validate(spec)?;
        }
        let redirect_keys: BTreeMap<ServiceKey, u16> = redirects
            .iter()
            .map(|r| {
                if desired
                    .iter()
                    .any(|d| d.vip == r.vip && !d.backends.is_empty())
                {
                    return Err(PlanError::Conflict(r.vip));
                }
                Ok((service_key(r.vip), r.port))
            })
            .collect::<Result<_, _>>()?;
        let mut upserts = Vec::new();
        let mut swaps = Vec::new();
        let mut freed: Vec<u32> = Vec::new();
        let wanted: BTreeMap<ServiceKey, &ServiceSpec> = desired
            .iter()
            .filter(|s| !s.backends.is_empty())
            .map(|s| (service_key(s.vip), s))
            .collect();

        for (key, spec) in &wanted {
            let id = match self.services.get(key) {
                Some(p) => p.id,
                None => self
                    .service_ids
                    .take(MAX_SERVICES)
                    .ok_or(PlanError::TooManyServices)?,
            };
            let old = self.services.remove(key);
            let mut old_backends = old.as_ref().map(|p| p.backends.clone()).unwrap_or_default();
            let mut backends = BTreeMap::new();
            let mut ids = Vec::with_capacity(spec.backends.len());
            for b in &spec.backends {
                let addr = to_kernel(*b);
                let id = match old_backends
                    .remove(&addr)
                    .or_else(|| backends.get(&addr).copied())
                {
                    Some(id) => id,
                    None => {
                        let id = self
                            .backend_ids
                            .take(MAX_BACKENDS)
                            .ok_or(PlanError::TooManyBackends)?;
                        upserts.push(MapOp::UpsertBackend { id, addr });
                        id
                    }
                };
                backends.insert(addr, id);
                ids.push(id);
            }
            freed.extend(old_backends.into_values());
            let slots: Arc<[u32]> = spec.table.iter().map(|&i| ids[i as usize]).collect();
            let count = backends.len() as u32;
            let unchanged = old
                .as_ref()
                .is_some_and(|p| p.slots == slots && p.backends.len() as u32 == count);
            if !unchanged {
                swaps.push(MapOp::SetTable {
                    service: id,
                    slots: slots.clone(),
                });
                swaps.push(MapOp::UpsertService {
                    key: *key,
                    value: Service {
                        id,
                        count,
                        mode: MODE_DIRECT,
                        _pad: 0,
                        proxy_port: 0,
                    },
                });
            }
            self.services.insert(
                *key,
                Programmed {
                    id,
                    backends,
                    slots,
                },
            );
        }
        for (key, port) in &redirect_keys {
            if self.redirects.get(key) != Some(port) {
                swaps.push(MapOp::UpsertService {
                    key: *key,
                    value: Service {
                        id: 0,
                        count: 0,
                        mode: MODE_REDIRECT,
                        _pad: 0,
                        proxy_port: port.to_be(),
                    },
                });
            }
        }

        let mut removals = Vec::new();
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let p = self.services.remove(&key).expect("listed above");
            // A VIP that turned REDIRECT was overwritten above: keep it.
            if !redirect_keys.contains_key(&key) {
                removals.push(MapOp::DeleteService { key });
            }
            removals.push(MapOp::DeleteTable { service: p.id });
            self.service_ids.give_back(p.id);
            freed.extend(p.backends.into_values());
        }
        for key in self.redirects.keys() {
            if !redirect_keys.contains_key(key) && !wanted.contains_key(key) {
                removals.push(MapOp::DeleteService { key: *key });
            }
        }
        self.redirects = redirect_keys;
        freed.append(&mut std::mem::take(&mut self.orphans).into_iter().collect());
        freed.sort_unstable();
        freed.dedup();
        for id in &freed {
            removals.push(MapOp::DeleteBackend { id: *id });
            self.backend_ids.give_back(*id);
        }

        upserts.extend(swaps);
        upserts.extend(removals);
        Ok(upserts)
    }
}

fn validate(spec: &ServiceSpec) -> Result<(), PlanError> {
    if spec.backends.is_empty() {
        return Ok(());
    }
    if spec.table.len() != MAGLEV_SIZE as usize {
        return Err(PlanError::TableSize {
            vip: spec.vip,
            got: spec.table.len(),
        });
    }
    if let Some((slot, &index)) = spec
        .table
        .iter()
        .enumerate()
        .find(|(_, &i)| i as usize >= spec.backends.len())
    {
        return Err(PlanError::SlotOutOfRange {
            vip: spec.vip,
            slot,
            index,
            count: spec.backends.len(),
        });
    }
    if let Some(b) = spec
        .backends
        .iter()
        .find(|b| b.is_ipv4() != spec.vip.is_ipv4())
    {
        return Err(PlanError::Family {
            vip: spec.vip,
            backend: *b,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::from_kernel;
    use legate_bpf_common::FAMILY_V6;

    fn spec(vip: &str, backends: &[&str]) -> ServiceSpec {
        let backends: Vec<SocketAddr> = backends.iter().map(|b| b.parse().unwrap()).collect();
        let n = backends.len().max(1) as u32;
        ServiceSpec {
            vip: vip.parse().unwrap(),
            table: (0..MAGLEV_SIZE).map(|i| i % n).collect(),
            backends,
        }
    }

    fn slots(ids: &[u32]) -> Arc<[u32]> {
        (0..MAGLEV_SIZE as usize)
            .map(|i| ids[i % ids.len()])
            .collect()
    }

    fn svc(id: u32, count: u32) -> Service {
        Service {
            id,
            count,
            mode: MODE_DIRECT,
            _pad: 0,
            proxy_port: 0,
        }
    }

    fn backend(s: &str) -> Addr {
        to_kernel(s.parse().unwrap())
    }

    #[test]
    fn first_push_adds_backends_then_table_then_service() {
        let mut st = State::default();
        let ops = st
            .plan(
                &[spec(
                    "127.100.0.1:80",
                    &["127.0.0.1:8001", "127.0.0.1:8002"],
                )],
                &[],
            )
            .unwrap();
        assert_eq!(
            ops,
            vec![
                MapOp::UpsertBackend {
                    id: 0,
                    addr: backend("127.0.0.1:8001")
                },
                MapOp::UpsertBackend {
                    id: 1,
                    addr: backend("127.0.0.1:8002")
                },
                MapOp::SetTable {
                    service: 0,
                    slots: slots(&[0, 1])
                },
                MapOp::UpsertService {
                    key: service_key("127.100.0.1:80".parse().unwrap()),
                    value: svc(0, 2)
                },
            ]
        );
        // The same push again changes nothing.
        assert_eq!(
            st.plan(
                &[spec(
                    "127.100.0.1:80",
                    &["127.0.0.1:8001", "127.0.0.1:8002"]
                )],
                &[]
            )
            .unwrap(),
            vec![]
        );
    }

    #[test]
    fn removing_a_backend_swaps_the_table_before_deleting_it() {
        let mut st = State::default();
        st.plan(
            &[spec(
                "127.100.0.1:80",
                &["127.0.0.1:8001", "127.0.0.1:8002"],
            )],
            &[],
        )
        .unwrap();
        let ops = st
            .plan(
                &[spec(
                    "127.100.0.1:80",
                    &["127.0.0.1:8002", "127.0.0.1:8003"],
                )],
                &[],
            )
            .unwrap();
        assert_eq!(
            ops,
            vec![
                MapOp::UpsertBackend {
                    id: 2,
                    addr: backend("127.0.0.1:8003")
                },
                MapOp::SetTable {
                    service: 0,
                    slots: slots(&[1, 2])
                },
                MapOp::UpsertService {
                    key: service_key("127.100.0.1:80".parse().unwrap()),
                    value: svc(0, 2)
                },
                MapOp::DeleteBackend { id: 0 },
            ]
        );
        // The freed id is reused only by a later plan.
        let ops = st
            .plan(
                &[spec(
                    "127.100.0.1:80",
                    &["127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:8004"],
                )],
                &[],
            )
            .unwrap();
        assert_eq!(
            ops[0],
            MapOp::UpsertBackend {
                id: 0,
                addr: backend("127.0.0.1:8004")
            }
        );
    }

    #[test]
    fn a_service_without_backends_or_config_is_removed() {
        let mut st = State::default();
        st.plan(
            &[
                spec("127.100.0.1:80", &["127.0.0.1:8001"]),
                spec("127.100.0.2:80", &["127.0.0.1:8002"]),
            ],
            &[],
        )
        .unwrap();
        let ops = st.plan(&[spec("127.100.0.2:80", &[])], &[]).unwrap();
        assert_eq!(
            ops,
            vec![
                MapOp::DeleteService {
                    key: service_key("127.100.0.1:80".parse().unwrap())
                },
                MapOp::DeleteTable { service: 0 },
                MapOp::DeleteService {
                    key: service_key("127.100.0.2:80".parse().unwrap())
                },
                MapOp::DeleteTable { service: 1 },
                MapOp::DeleteBackend { id: 0 },
                MapOp::DeleteBackend { id: 1 },
            ]
        );
        assert_eq!(st.services().count(), 0);
    }

    #[test]
    fn adopted_maps_keep_service_ids_and_drop_orphans_after_the_swap() {
        let key = service_key("127.100.0.1:80".parse().unwrap());
        let mut st = State::restore(&[(key, svc(7, 1))], &[3, 9]);
        let ops = st
            .plan(&[spec("127.100.0.1:80", &["127.0.0.1:8001"])], &[])
            .unwrap();
        assert_eq!(
            ops,
            vec![
                MapOp::UpsertBackend {
                    id: 0,
                    addr: backend("127.0.0.1:8001")
                },
                MapOp::SetTable {
                    service: 7,
                    slots: slots(&[0])
                },
                MapOp::UpsertService {
                    key,
                    value: svc(7, 1)
                },
                MapOp::DeleteBackend { id: 3 },
                MapOp::DeleteBackend { id: 9 },
            ]
        );
    }

    #[test]
    fn redirects_are_services_without_tables_and_can_turn_direct() {
        let mut st = State::default();
        let vip: SocketAddr = "127.100.0.5:80".parse().unwrap();
        let r = Redirect { vip, port: 15001 };
        let redirect = MapOp::UpsertService {
            key: service_key(vip),
            value: Service {
                id: 0,
                count: 0,
                mode: MODE_REDIRECT,
                _pad: 0,
                proxy_port: 15001u16.to_be(),
            },
        };
        assert_eq!(st.plan(&[], &[r]).unwrap(), vec![redirect.clone()]);
        assert_eq!(st.plan(&[], &[r]).unwrap(), vec![]);
        // REDIRECT -> DIRECT: the service entry is overwritten, not deleted.
        let ops = st
            .plan(&[spec("127.100.0.5:80", &["127.0.0.1:8001"])], &[])
            .unwrap();
        assert!(
            !ops.iter().any(|o| matches!(o, MapOp::DeleteService { .. })),
            "{ops:?}"
        );
        // DIRECT -> REDIRECT: the table and backend go, the key stays.
        let ops = st.plan(&[], &[r]).unwrap();
        assert_eq!(
            ops,
            vec![
                redirect,
                MapOp::DeleteTable { service: 0 },
                MapOp::DeleteBackend { id: 0 }
            ]
        );
        // Gone.
        assert_eq!(
            st.plan(&[], &[]).unwrap(),
            vec![MapOp::DeleteService {
                key: service_key(vip)
            }]
        );
        // An IPv6 VIP is keyed by its own family; the port is the same.
        let v6: SocketAddr = "[fd00::4]:80".parse().unwrap();
        let ops = st
            .plan(
                &[],
                &[Redirect {
                    vip: v6,
                    port: 15001,
                }],
            )
            .unwrap();
        let [MapOp::UpsertService { key, value }] = &ops[..] else {
            panic!("{ops:?}")
        };
        assert_eq!((key.addr.family, value.mode), (FAMILY_V6, MODE_REDIRECT));
        assert_eq!(from_kernel(&key.addr), v6);
        assert_eq!(value.proxy_port, 15001u16.to_be());
    }

    #[test]
    fn bad_tables_are_rejected_before_anything_changes() {
        let mut st = State::default();
        let mut s = spec("127.100.0.1:80", &["127.0.0.1:8001"]);
        s.table = Arc::from(vec![0u32; 10]);
        assert!(matches!(
            st.plan(&[s], &[]),
            Err(PlanError::TableSize { .. })
        ));
        let mut s = spec("127.100.0.1:80", &["127.0.0.1:8001"]);
        s.table = Arc::from(vec![1u32; MAGLEV_SIZE as usize]);
        assert!(matches!(
            st.plan(&[s], &[]),
            Err(PlanError::SlotOutOfRange { .. })
        ));
        let s = spec("127.100.0.1:80", &["[::1]:8001"]);
        assert!(matches!(st.plan(&[s], &[]), Err(PlanError::Family { .. })));
        assert_eq!(st.services().count(), 0);
    }
}
