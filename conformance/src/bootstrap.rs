//! The one-listener bootstraps the http tier's runners use: admin, one
//! listener on 127.0.0.1 whose connection manager has the router and one
//! route, and at most one cluster with one endpoint.

/// `hcm_extra`: extra connection-manager fields as one YAML flow line (or
/// empty); `route`: the route's action as YAML flow; `cluster`: (name,
/// endpoint port, extra cluster fields as YAML flow) or none.
pub fn single_listener(
    admin: u16,
    port: u16,
    stat_prefix: &str,
    hcm_extra: &str,
    route: &str,
    cluster: Option<(&str, u16, &str)>,
) -> String {
    let extra = if hcm_extra.is_empty() {
        String::new()
    } else {
        format!("\n          {hcm_extra}")
    };
    let mut out = format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: {stat_prefix}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat_prefix}{extra}
          route_config:
            virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, {route}}}]}}]
          http_filters: [{{name: r, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
"#
    );
    if let Some((name, endpoint, fields)) = cluster {
        let fields = if fields.is_empty() {
            String::new()
        } else {
            format!(", {fields}")
        };
        out.push_str(&format!(
            "  clusters:\n  - {{name: {name}, connect_timeout: 1s{fields}, load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {endpoint}}}}}}}}}]}}]}}}}\n"
        ));
    }
    out
}

/// A [`single_listener`] bootstrap on fresh ports, written to
/// `<work>/<name>.yaml` (`name` is also the stat prefix) after `edit`.
pub struct Written {
    pub path: std::path::PathBuf,
    pub port: u16,
    pub admin: u16,
}

pub fn write_single(
    work: &std::path::Path,
    name: &str,
    hcm_extra: &str,
    route: &str,
    cluster: Option<(&str, u16, &str)>,
    edit: impl FnOnce(String) -> String,
) -> std::io::Result<Written> {
    let (port, admin) = (
        legate_tests::legate::free_port(),
        legate_tests::legate::free_port(),
    );
    let path = work.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        edit(single_listener(
            admin, port, name, hcm_extra, route, cluster,
        )),
    )?;
    Ok(Written { path, port, admin })
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_yaml_with_the_parts_asked_for() {
        let text = super::single_listener(
            1,
            2,
            "s",
            "upgrade_configs: [{upgrade_type: websocket}]",
            "route: {cluster: a}",
            Some(("a", 3, "")),
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let hcm = &v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        assert_eq!(hcm["upgrade_configs"][0]["upgrade_type"], "websocket");
        assert_eq!(
            v["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
                [0]["endpoint"]["address"]["socket_address"]["port_value"],
            3
        );
        assert!(
            super::single_listener(1, 2, "s", "", "direct_response: {status: 200}", None)
                .find("clusters")
                .is_none()
        );
    }
}
