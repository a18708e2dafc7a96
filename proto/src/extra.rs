//! Message types that control planes send and no crate ships as `.proto`
//! sources: `udpa.type.v1.TypedStruct` (the `udpa` tree is not in
//! `envoy-types`), the xDS CEL matcher and its input, and the config types
//! of Istio's own proxy extensions.
//!
//! Each is declared here field by field (names, numbers and types are facts
//! of the wire format, written out by hand, not copied sources) and added to
//! the descriptor pool, so that these configs decode, walk and convert like
//! any Envoy type.

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto, MessageOptions,
};

/// One field: (name, number, type, type name for messages and enums).
pub struct F {
    pub name: &'static str,
    pub number: i32,
    pub ty: Type,
    pub label: Label,
    /// Fully qualified with a leading dot, for messages and enums.
    pub type_name: &'static str,
    /// Index of the oneof it belongs to.
    pub oneof: Option<i32>,
}

/// A singular scalar field.
pub const fn scalar(name: &'static str, number: i32, ty: Type) -> F {
    F {
        name,
        number,
        ty,
        label: Label::Optional,
        type_name: "",
        oneof: None,
    }
}

/// A singular message field.
pub const fn message(name: &'static str, number: i32, type_name: &'static str) -> F {
    F {
        name,
        number,
        ty: Type::Message,
        label: Label::Optional,
        type_name,
        oneof: None,
    }
}

/// A singular enum field.
pub const fn enumeration(name: &'static str, number: i32, type_name: &'static str) -> F {
    F {
        name,
        number,
        ty: Type::Enum,
        label: Label::Optional,
        type_name,
        oneof: None,
    }
}

impl F {
    pub const fn repeated(mut self) -> F {
        self.label = Label::Repeated;
        self
    }

    pub const fn in_oneof(mut self, index: i32) -> F {
        self.oneof = Some(index);
        self
    }
}

/// A message: its name, fields, oneof names, nested types and enums.
pub struct M {
    pub name: &'static str,
    pub fields: Vec<F>,
    pub oneofs: &'static [&'static str],
    pub nested: Vec<M>,
    pub enums: Vec<E>,
    /// A map entry type (`map<K, V>` is a nested `XEntry` with this set).
    pub map_entry: bool,
}

impl M {
    pub fn new(name: &'static str, fields: Vec<F>) -> M {
        M {
            name,
            fields,
            oneofs: &[],
            nested: Vec::new(),
            enums: Vec::new(),
            map_entry: false,
        }
    }

    /// The nested entry type of a `map<string, V>` field named `field`.
    pub fn map_entry(entry: &'static str, value: F) -> M {
        let mut m = M::new(entry, vec![scalar("key", 1, Type::String), value]);
        m.map_entry = true;
        m
    }

    fn descriptor(self) -> DescriptorProto {
        DescriptorProto {
            name: Some(self.name.into()),
            field: self.fields.into_iter().map(field).collect(),
            nested_type: self.nested.into_iter().map(M::descriptor).collect(),
            enum_type: self.enums.into_iter().map(E::descriptor).collect(),
            oneof_decl: self
                .oneofs
                .iter()
                .map(|n| prost_types::OneofDescriptorProto {
                    name: Some((*n).into()),
                    options: None,
                })
                .collect(),
            options: self.map_entry.then(|| MessageOptions {
                map_entry: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// An enum: its name and (value name, number) pairs.
pub struct E {
    pub name: &'static str,
    pub values: &'static [(&'static str, i32)],
}

impl E {
    fn descriptor(self) -> EnumDescriptorProto {
        EnumDescriptorProto {
            name: Some(self.name.into()),
            value: self
                .values
                .iter()
                .map(|(n, v)| EnumValueDescriptorProto {
                    name: Some((*n).into()),
                    number: Some(*v),
                    options: None,
                })
                .collect(),
            ..Default::default()
        }
    }
}

fn field(f: F) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(f.name.into()),
        number: Some(f.number),
        label: Some(f.label as i32),
        r#type: Some(f.ty as i32),
        type_name: (!f.type_name.is_empty()).then(|| f.type_name.into()),
        json_name: Some(json_name(f.name)),
        oneof_index: f.oneof,
        ..Default::default()
    }
}

/// protoc's JSON name: lowerCamelCase of the field name.
fn json_name(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A proto3 file declaring `messages` (and `enums`) in `package`.
pub fn file(
    name: &str,
    package: &str,
    dependency: &[&str],
    messages: Vec<M>,
    enums: Vec<E>,
) -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some(name.into()),
        package: Some(package.into()),
        dependency: dependency.iter().map(|d| (*d).into()).collect(),
        message_type: messages.into_iter().map(M::descriptor).collect(),
        enum_type: enums.into_iter().map(E::descriptor).collect(),
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

/// Every file this module declares, in dependency order.
pub fn files() -> Vec<FileDescriptorProto> {
    let typed_struct = |package: &str| {
        file(
            &format!(
                "legate/extra/{}/typed_struct.proto",
                package.replace('.', "/")
            ),
            package,
            &["google/protobuf/struct.proto"],
            vec![M::new(
                "TypedStruct",
                vec![
                    scalar("type_url", 1, Type::String),
                    message("value", 2, ".google.protobuf.Struct"),
                ],
            )],
            vec![],
        )
    };
    // The two wrappers have one layout; `xds.type.v3` is in the Envoy set
    // only when some compiled file imports it.
    let mut out = vec![typed_struct("udpa.type.v1"), typed_struct("xds.type.v3")];
    // The CEL matcher and its input: `xds/type/matcher/v3/cel.proto` and
    // `http_inputs.proto` are not among envoy-types' sources.
    out.push(file(
        "legate/extra/xds/type/matcher/v3/cel.proto",
        "xds.type.matcher.v3",
        &["xds/type/v3/cel.proto"],
        vec![
            M::new(
                "CelMatcher",
                vec![
                    message("expr_match", 1, ".xds.type.v3.CelExpression"),
                    scalar("description", 2, Type::String),
                ],
            ),
            M::new("HttpAttributesCelMatchInput", vec![]),
        ],
        vec![],
    ));
    out.extend(crate::istio::files());
    out
}

/// Adds each declared file whose types the pool does not have yet.
pub fn add_missing(pool: &mut prost_reflect::DescriptorPool) {
    for f in files() {
        let package = f.package().to_string();
        let first = f.message_type.first().map(|m| m.name().to_string());
        if first.is_some_and(|m| {
            pool.get_message_by_name(&format!("{package}.{m}"))
                .is_some()
        }) {
            continue;
        }
        pool.add_file_descriptor_proto(f)
            .expect("Legate's own declarations are valid");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_names_are_protocs() {
        assert_eq!(super::json_name("type_url"), "typeUrl");
        assert_eq!(super::json_name("value"), "value");
        assert_eq!(super::json_name("a_b_c"), "aBC");
    }

    #[test]
    fn the_cel_matcher_is_in_the_pool() {
        let d = crate::pool()
            .get_message_by_name("xds.type.matcher.v3.CelMatcher")
            .unwrap();
        assert_eq!(d.get_field_by_name("expr_match").unwrap().number(), 1);
    }

    #[test]
    fn the_udpa_typed_struct_is_in_the_pool() {
        let d = crate::pool()
            .get_message_by_name("udpa.type.v1.TypedStruct")
            .unwrap();
        assert_eq!(d.get_field_by_name("value").unwrap().number(), 2);
    }
}
