//! Dynamic route tables: RDS route configurations by name and the SRDS
//! scopes, each published whole with `ArcSwap` so a request sees one
//! consistent table while xDS replaces them.

use crate::config::listener::RouteSource;
use crate::config::route::RouteConfig;
use crate::config::scoped::{self, Scope};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default)]
pub struct RouteTables {
    pub rds: ArcSwap<HashMap<String, Arc<RouteConfig>>>,
    pub scopes: ArcSwap<Vec<Scope>>,
}

impl RouteTables {
    pub fn get(&self, name: &str) -> Option<Arc<RouteConfig>> {
        self.rds.load().get(name).cloned()
    }

    /// The route table a request uses: the inline one, the RDS one, or the
    /// one of the scope its key selects. None: Envoy's 404 (no route).
    pub fn resolve(
        &self,
        source: &RouteSource,
        header: &dyn Fn(&str) -> Option<String>,
    ) -> Option<Arc<RouteConfig>> {
        match source {
            RouteSource::Static(rc) => Some(rc.clone()),
            RouteSource::Rds { name, .. } => self.get(name),
            RouteSource::Scoped(s) => {
                let key = scoped::request_key(&s.fragments, header)?;
                let route = match &s.scopes {
                    crate::config::listener::ScopeList::Inline(list) => {
                        scoped::find(list, &key)?.route.clone()
                    }
                    crate::config::listener::ScopeList::Srds(_) => {
                        scoped::find(&self.scopes.load(), &key)?.route.clone()
                    }
                };
                self.get(&route)
            }
        }
    }
}
