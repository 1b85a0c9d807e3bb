//! Services and EndpointSlices decoded straight into the form the sources keep. The API's
//! types decode every field of every object (an EndpointSlice's endpoints with their target
//! references, zones and condition structs, `managedFields`, `last-applied-configuration`),
//! only for most of it to be dropped by [`Keep`] a moment later: at 100 000 services × 10
//! endpoints that was most of the listing's allocations and CPU. These types skip what the
//! model never reads while the JSON is read (serde's `IgnoredAny` allocates nothing), and keep
//! the rest exactly as the API's types followed by [`Keep`] would (a test compares them).

use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        core::v1::{LoadBalancerStatus, Service, ServiceSpec, ServiceStatus},
        discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Resource;
use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use super::{Keep, Trim as _};
use crate::{
    dsr::DSR_ANNOTATION,
    maglev::LB_ALGORITHM_ANNOTATION,
    model::{Hints, SERVICE_NAME_LABEL, Slice, SliceEndpoint},
};

/// A Service as the API source watches it: metadata without what [`super::Trim`] drops
/// (except `resourceVersion`, which the watcher resumes from), status without conditions.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(try_from = "WireService")]
pub struct ApiService(pub Service);

/// An EndpointSlice as the API source watches it: the model's compact [`Slice`] (its
/// namespace and name still in `metadata`), and the metadata the watcher reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(try_from = "WireSlice")]
pub struct ApiSlice {
    /// Name, namespace and `resourceVersion`.
    pub metadata: ObjectMeta,
    /// The rest, as kept.
    pub slice: Slice,
}

impl Keep for ApiService {
    type Kept = Service;

    fn keep(self) -> Service {
        let mut service = self.0;
        service.trim();
        service
    }
}

impl Keep for ApiSlice {
    type Kept = Slice;

    fn keep(self) -> Slice {
        Slice {
            namespace: self.metadata.namespace.unwrap_or_default(),
            name: self.metadata.name.unwrap_or_default(),
            ..self.slice
        }
    }
}

/// `Resource` as the API type `$api` has it: same kind, group, version and URL.
macro_rules! resource_as {
    ($ty:ty, $api:ty, $($meta:tt)+) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(dt: &()) -> Cow<'_, str> {
                <$api as Resource>::kind(dt)
            }

            fn group(dt: &()) -> Cow<'_, str> {
                <$api as Resource>::group(dt)
            }

            fn version(dt: &()) -> Cow<'_, str> {
                <$api as Resource>::version(dt)
            }

            fn plural(dt: &()) -> Cow<'_, str> {
                <$api as Resource>::plural(dt)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.$($meta)+
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.$($meta)+
            }
        }
    };
}

resource_as!(ApiService, Service, 0.metadata);
resource_as!(ApiSlice, EndpointSlice, metadata);

/// `kind` and `apiVersion`, when present, must name the expected type (as the API's types check).
fn check_type<T: k8s_openapi::Resource>(kind: Option<&str>, api_version: Option<&str>) -> Result<(), String> {
    match (kind, api_version) {
        (Some(kind), _) if kind != T::KIND => Err(format!("kind {kind:?}, expected {:?}", T::KIND)),
        (_, Some(version)) if version != T::API_VERSION => {
            Err(format!("apiVersion {version:?}, expected {:?}", T::API_VERSION))
        }
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireService {
    kind: Option<String>,
    api_version: Option<String>,
    metadata: Option<WireMeta>,
    spec: Option<ServiceSpec>,
    status: Option<WireServiceStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireServiceStatus {
    load_balancer: Option<LoadBalancerStatus>,
}

impl TryFrom<WireService> for ApiService {
    type Error = String;

    fn try_from(wire: WireService) -> Result<Self, String> {
        check_type::<Service>(wire.kind.as_deref(), wire.api_version.as_deref())?;
        Ok(Self(Service {
            metadata: wire.metadata.map(ObjectMeta::from).unwrap_or_default(),
            spec: wire.spec,
            status: wire.status.map(|s| ServiceStatus { load_balancer: s.load_balancer, conditions: None }),
        }))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSlice {
    kind: Option<String>,
    api_version: Option<String>,
    metadata: Option<WireMeta>,
    address_type: Option<String>,
    endpoints: Option<Vec<WireEndpoint>>,
    ports: Option<Vec<EndpointPort>>,
}

impl TryFrom<WireSlice> for ApiSlice {
    type Error = String;

    fn try_from(wire: WireSlice) -> Result<Self, String> {
        check_type::<EndpointSlice>(wire.kind.as_deref(), wire.api_version.as_deref())?;
        let mut meta = wire.metadata.unwrap_or_default();
        let service_name = meta.labels.as_mut().and_then(|labels| labels.remove(SERVICE_NAME_LABEL));
        let ports = wire.ports.unwrap_or_default().into_iter().map(|p| EndpointPort { app_protocol: None, ..p });
        let endpoints = wire.endpoints.unwrap_or_default().into_iter().map(|e| e.0);
        let slice = Slice {
            namespace: String::new(),
            name: String::new(),
            service_name,
            address_type: wire.address_type.unwrap_or_default(),
            ports: ports.collect(),
            endpoints: endpoints.collect(),
        };
        let metadata = ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            resource_version: meta.resource_version,
            ..ObjectMeta::default()
        };
        Ok(Self { metadata, slice })
    }
}

/// The metadata the model and the watcher read; the rest (managedFields, ownerReferences,
/// uid, timestamps, other annotations) is skipped unread.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "kept_annotations")]
    annotations: Option<BTreeMap<String, String>>,
}

impl From<WireMeta> for ObjectMeta {
    fn from(meta: WireMeta) -> Self {
        ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            resource_version: meta.resource_version,
            labels: meta.labels,
            annotations: meta.annotations.filter(|a| !a.is_empty()),
            ..ObjectMeta::default()
        }
    }
}

/// The annotations any kept object reads; a `last-applied-configuration` is often the
/// largest part of an object, and is skipped without being copied.
const KEPT_ANNOTATIONS: [&str; 2] = [LB_ALGORITHM_ANNOTATION, DSR_ANNOTATION];

fn kept_annotations<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    Option::<KeptAnnotations>::deserialize(deserializer).map(|kept| kept.map(|k| k.0))
}

/// The kept annotations of one object.
struct KeptAnnotations(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for KeptAnnotations {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Annotations;

        impl<'de> Visitor<'de> for Annotations {
            type Value = KeptAnnotations;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of annotations")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeptAnnotations, A::Error> {
                let mut kept = BTreeMap::new();
                while let Some(AnnotationKey(key)) = map.next_key()? {
                    match key {
                        Some(key) => _ = kept.insert(key, map.next_value()?),
                        None => _ = map.next_value::<IgnoredAny>()?,
                    }
                }
                Ok(KeptAnnotations(kept))
            }
        }

        deserializer.deserialize_map(Annotations)
    }
}

/// An annotation's key, copied only when it is one of [`KEPT_ANNOTATIONS`].
struct AnnotationKey(Option<String>);

impl<'de> Deserialize<'de> for AnnotationKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Key;

        impl Visitor<'_> for Key {
            type Value = AnnotationKey;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an annotation key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<AnnotationKey, E> {
                Ok(AnnotationKey(KEPT_ANNOTATIONS.contains(&key).then(|| key.to_owned())))
            }
        }

        deserializer.deserialize_str(Key)
    }
}

/// One endpoint, decoded into the model's form as it is read: of `addresses` only the first
/// is copied, the node name is looked up among the shared ones without a copy, and target
/// references, zones and the like are skipped.
struct WireEndpoint(SliceEndpoint);

impl<'de> Deserialize<'de> for WireEndpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Endpoint<'a> {
            addresses: Option<FirstAddress>,
            // Borrowed from the JSON when it has no escapes: only one copy per node is kept.
            #[serde(borrow)]
            node_name: Option<Cow<'a, str>>,
            hints: Option<WireHints>,
            conditions: Option<EndpointConditions>,
        }

        let e = Endpoint::<'de>::deserialize(deserializer)?;
        let hints = e.hints.map(|h| Hints {
            for_nodes: h.for_nodes.into_iter().flatten().map(|n| n.name).collect(),
            for_zones: h.for_zones.into_iter().flatten().map(|z| z.name).collect(),
        });
        let address = e.addresses.and_then(|a| a.0);
        Ok(Self(SliceEndpoint::from_api(address, e.node_name.as_deref(), hints, e.conditions.unwrap_or_default())))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireHints {
    for_nodes: Option<Vec<Named>>,
    for_zones: Option<Vec<Named>>,
}

/// A `forNodes` or `forZones` entry.
#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    name: String,
}

/// The first of a list of addresses; the others are skipped unread (kube-proxy uses only
/// the first).
struct FirstAddress(Option<Box<str>>);

impl<'de> Deserialize<'de> for FirstAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct First;

        impl<'de> Visitor<'de> for First {
            type Value = FirstAddress;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of addresses")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstAddress, A::Error> {
                let first = seq.next_element::<Box<str>>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstAddress(first))
            }
        }

        deserializer.deserialize_seq(First)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// Decodes `object` both ways: as the API's type followed by [`Keep`], and directly.
    fn both<Api, Wire>(object: &Value) -> (Api::Kept, Wire::Kept)
    where
        Api: Keep + de::DeserializeOwned,
        Wire: Keep<Kept = Api::Kept> + de::DeserializeOwned,
    {
        let text = object.to_string();
        let api: Api = serde_json::from_str(&text).expect("the API's type reads it");
        let wire: Wire = serde_json::from_str(&text).expect("the wire type reads it");
        (api.keep(), wire.keep())
    }

    /// Slices as the API serves them, with every field the model reads in its absent, null,
    /// empty and set forms, and fields it does not read (which must not matter).
    fn slices() -> Vec<Value> {
        vec![
            json!({"metadata": {"name": "web-a", "namespace": "prod", "resourceVersion": "7",
                                "labels": {SERVICE_NAME_LABEL: "web", "other": "x"},
                                "annotations": {"a": "b"}, "uid": "u", "generateName": "web-",
                                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u"}],
                                "managedFields": [{"manager": "m", "fieldsV1": {"f:x": {}}}]},
                   "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                   "addressType": "IPv4",
                   "endpoints": [
                       {"addresses": ["10.0.0.1", "10.0.0.9"], "nodeName": "n1", "zone": "a",
                        "conditions": {"ready": false, "serving": false, "terminating": true},
                        "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}]},
                        "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "prod"}},
                       {"addresses": [], "nodeName": "n\u{0031}", "hints": {}},
                       {"addresses": ["10.0.0.2"], "conditions": {}, "hints": {"forZones": null}},
                       {"addresses": null, "nodeName": null, "conditions": null, "hints": null},
                       {}
                   ],
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"},
                             {"port": null}]}),
            json!({"metadata": {"name": "bare"}, "addressType": "IPv6", "endpoints": null, "ports": null}),
            json!({"metadata": {"name": "escaped\"name", "namespace": "n", "labels": null, "annotations": null},
                   "endpoints": [{"addresses": ["fd00::1"], "nodeName": "node\\u0032"}]}),
            json!({}),
        ]
    }

    /// Every slice decodes to the same kept form both ways (without this, a field the model
    /// reads could be dropped or read differently by the API source alone).
    #[test]
    fn a_slice_decoded_directly_keeps_what_the_apis_type_keeps() {
        for object in slices() {
            let (api, wire) = both::<EndpointSlice, ApiSlice>(&object);
            assert_eq!(api, wire, "{object}");
        }
    }

    /// The watcher reads the name, namespace and resourceVersion of what it decodes.
    #[test]
    fn a_slice_decoded_directly_keeps_the_metadata_the_watcher_reads() {
        let slice: ApiSlice = serde_json::from_value(slices()[0].clone()).unwrap();
        let meta = slice.meta();
        assert_eq!(
            (meta.name.as_deref(), meta.namespace.as_deref(), meta.resource_version.as_deref()),
            (Some("web-a"), Some("prod"), Some("7"))
        );
        assert_eq!(<ApiSlice as Resource>::url_path(&(), None), "/apis/discovery.k8s.io/v1/endpointslices");
        assert_eq!(<ApiService as Resource>::url_path(&(), None), "/api/v1/services");
    }

    /// Services with every part the model reads, and parts it does not.
    fn services() -> Vec<Value> {
        vec![
            json!({"metadata": {"name": "web", "namespace": "prod", "resourceVersion": "3",
                                "labels": {"service.kubernetes.io/headless": "", "app": "web"},
                                "annotations": {LB_ALGORITHM_ANNOTATION: "maglev",
                                                "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": 1}"},
                                "managedFields": [{"manager": "kubectl"}], "finalizers": ["x"]},
                   "kind": "Service", "apiVersion": "v1",
                   "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                            "ipFamilies": ["IPv4"], "externalIPs": ["192.0.2.1"],
                            "loadBalancerSourceRanges": ["192.0.2.0/24"], "sessionAffinity": "ClientIP",
                            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                            "externalTrafficPolicy": "Local", "healthCheckNodePort": 30001,
                            "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080,
                                       "protocol": "TCP"}, {"port": 53, "targetPort": 5353, "protocol": "UDP"}]},
                   "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.9", "ipMode": "VIP"}]},
                              "conditions": [{"type": "t", "status": "True", "reason": "r", "message": "m",
                                              "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
            json!({"metadata": {"name": "plain", "annotations": {"other": "x"}}, "spec": {"clusterIP": "None"}}),
            json!({"metadata": {"name": "nulls", "labels": null, "annotations": null}, "spec": null, "status": null}),
            json!({"status": {}}),
            json!({}),
        ]
    }

    /// Every service decodes to the same kept form both ways.
    #[test]
    fn a_service_decoded_directly_keeps_what_the_apis_type_keeps() {
        for object in services() {
            let (api, wire) = both::<Service, ApiService>(&object);
            assert_eq!(api, wire, "{object}");
        }
    }

    /// An object of another kind or version is refused both ways, as the API's types refuse it.
    #[test]
    fn another_kind_is_refused() {
        let wrong = [json!({"kind": "Pod"}), json!({"apiVersion": "v2"})];
        for object in wrong {
            assert!(serde_json::from_value::<ApiService>(object.clone()).is_err(), "{object}");
            assert!(serde_json::from_value::<ApiSlice>(object.clone()).is_err(), "{object}");
        }
        let bad_list = json!({"endpoints": "not a list"});
        assert!(serde_json::from_value::<EndpointSlice>(bad_list.clone()).is_err());
        assert!(serde_json::from_value::<ApiSlice>(bad_list).is_err());
    }
}
