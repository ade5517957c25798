//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) on the agent socket, so tools
//! like grpcurl can list and call the Workload API, SDS and health without local protos.
//!
//! Answers from the file descriptor set compiled with our protos
//! ([`svidcar_proto::FILE_DESCRIPTOR_SET`]): `list_services`, `file_by_filename` and
//! `file_containing_symbol` (the file first, then its transitive imports). We define no
//! extensions: `all_extension_numbers_of_type` answers an empty list for a known message and
//! `file_containing_extension` is `NOT_FOUND`. The two versions share one implementation (their
//! messages are identical on the wire).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use svidcar_proto::grpc_reflection::{v1, v1alpha};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

/// The indexed descriptor set.
#[derive(Debug, Default)]
pub struct Index {
    files: HashMap<String, FileDescriptorProto>,
    encoded: HashMap<String, Vec<u8>>,
    symbols: HashMap<String, String>,
    messages: BTreeSet<String>,
    services: Vec<String>,
}

fn qualify(pkg: &str, name: &str) -> String {
    if pkg.is_empty() {
        name.to_string()
    } else {
        format!("{pkg}.{name}")
    }
}

impl Index {
    /// Indexes an encoded `FileDescriptorSet`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        let set = FileDescriptorSet::decode(bytes)?;
        let mut ix = Self::default();
        for f in set.file {
            let name = f.name().to_string();
            let pkg = f.package().to_string();
            for m in &f.message_type {
                ix.add_message(&pkg, m, &name);
            }
            for e in &f.enum_type {
                ix.symbols.insert(qualify(&pkg, e.name()), name.clone());
            }
            for s in &f.service {
                let full = qualify(&pkg, s.name());
                for m in &s.method {
                    ix.symbols
                        .insert(format!("{full}.{}", m.name()), name.clone());
                }
                ix.symbols.insert(full.clone(), name.clone());
                ix.services.push(full);
            }
            ix.encoded.insert(name.clone(), f.encode_to_vec());
            ix.files.insert(name, f);
        }
        ix.services.sort();
        Ok(ix)
    }

    fn add_message(&mut self, scope: &str, m: &DescriptorProto, file: &str) {
        let full = qualify(scope, m.name());
        for n in &m.nested_type {
            self.add_message(&full, n, file);
        }
        for e in &m.enum_type {
            self.symbols
                .insert(qualify(&full, e.name()), file.to_string());
        }
        self.messages.insert(full.clone());
        self.symbols.insert(full, file.to_string());
    }

    /// Fully-qualified names of every service.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// `name` and its transitive imports, encoded, `name` first.
    fn file_with_deps(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        self.files.get(name)?;
        let mut order = vec![name.to_string()];
        let mut seen: BTreeSet<String> = order.iter().cloned().collect();
        let mut i = 0;
        while i < order.len() {
            if let Some(f) = self.files.get(&order[i]) {
                for d in &f.dependency {
                    if seen.insert(d.clone()) {
                        order.push(d.clone());
                    }
                }
            }
            i += 1;
        }
        Some(
            order
                .iter()
                .filter_map(|n| self.encoded.get(n).cloned())
                .collect(),
        )
    }

    /// Answers one request.
    pub fn answer(&self, req: &v1::ServerReflectionRequest) -> MessageResponse {
        let not_found = |what: String| {
            MessageResponse::ErrorResponse(v1::ErrorResponse {
                error_code: tonic::Code::NotFound as i32,
                error_message: what,
            })
        };
        let files = |v: Vec<Vec<u8>>| {
            MessageResponse::FileDescriptorResponse(v1::FileDescriptorResponse {
                file_descriptor_proto: v,
            })
        };
        match &req.message_request {
            Some(MessageRequest::ListServices(_)) => {
                MessageResponse::ListServicesResponse(v1::ListServiceResponse {
                    service: self
                        .services
                        .iter()
                        .map(|s| v1::ServiceResponse { name: s.clone() })
                        .collect(),
                })
            }
            Some(MessageRequest::FileByFilename(name)) => match self.file_with_deps(name) {
                Some(v) => files(v),
                None => not_found(format!("file {name:?} not found")),
            },
            Some(MessageRequest::FileContainingSymbol(sym)) => {
                let sym = sym.trim_start_matches('.');
                match self.symbols.get(sym).and_then(|f| self.file_with_deps(f)) {
                    Some(v) => files(v),
                    None => not_found(format!("symbol {sym:?} not found")),
                }
            }
            Some(MessageRequest::AllExtensionNumbersOfType(t)) => {
                let t = t.trim_start_matches('.');
                if self.messages.contains(t) {
                    MessageResponse::AllExtensionNumbersResponse(v1::ExtensionNumberResponse {
                        base_type_name: t.to_string(),
                        extension_number: Vec::new(),
                    })
                } else {
                    not_found(format!("type {t:?} not found"))
                }
            }
            Some(MessageRequest::FileContainingExtension(e)) => not_found(format!(
                "no extension {} of {:?}",
                e.extension_number, e.containing_type
            )),
            None => MessageResponse::ErrorResponse(v1::ErrorResponse {
                error_code: tonic::Code::InvalidArgument as i32,
                error_message: "empty reflection request".into(),
            }),
        }
    }

    fn respond(&self, req: v1::ServerReflectionRequest) -> v1::ServerReflectionResponse {
        v1::ServerReflectionResponse {
            valid_host: req.host.clone(),
            message_response: Some(self.answer(&req)),
            original_request: Some(req),
        }
    }
}

/// The reflection service (both versions share the index).
#[derive(Clone)]
pub struct Reflection {
    index: Arc<Index>,
}

impl Reflection {
    /// Builds the service from our compiled descriptor set.
    pub fn new() -> Result<Self, prost::DecodeError> {
        Ok(Self {
            index: Arc::new(Index::from_bytes(svidcar_proto::FILE_DESCRIPTOR_SET)?),
        })
    }

    /// The `grpc.reflection.v1` service.
    pub fn v1(&self) -> v1::server_reflection_server::ServerReflectionServer<Self> {
        v1::server_reflection_server::ServerReflectionServer::new(self.clone())
    }

    /// The `grpc.reflection.v1alpha` service.
    pub fn v1alpha(&self) -> v1alpha::server_reflection_server::ServerReflectionServer<Self> {
        v1alpha::server_reflection_server::ServerReflectionServer::new(self.clone())
    }
}

/// Re-encodes between the two versions' identical messages.
fn convert<A: Message, B: Message + Default>(a: &A) -> Result<B, Status> {
    B::decode(a.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("reflection message conversion: {e}")))
}

/// Runs one reflection stream, converting through the v1 messages.
fn run<Req, Resp>(
    index: Arc<Index>,
    mut inbound: Streaming<Req>,
) -> ReceiverStream<Result<Resp, Status>>
where
    Req: Message + Default + 'static,
    Resp: Message + Default + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok(Some(req)) = inbound.message().await {
            let out = convert::<Req, v1::ServerReflectionRequest>(&req)
                .and_then(|r| convert::<_, Resp>(&index.respond(r)));
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = ReceiverStream<Result<v1::ServerReflectionResponse, Status>>;

    async fn server_reflection_info(
        &self,
        req: Request<Streaming<v1::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(run(self.index.clone(), req.into_inner())))
    }
}

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream =
        ReceiverStream<Result<v1alpha::ServerReflectionResponse, Status>>;

    async fn server_reflection_info(
        &self,
        req: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(run(self.index.clone(), req.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_lists_services_and_finds_symbols() {
        let ix = Index::from_bytes(svidcar_proto::FILE_DESCRIPTOR_SET).unwrap();
        for s in crate::agent::grpc_health::SERVICES
            .iter()
            .filter(|s| !s.is_empty())
        {
            assert!(
                ix.services().iter().any(|x| x == s),
                "{s} not listed: {:?}",
                ix.services()
            );
        }
        let ask = |r: MessageRequest| {
            ix.answer(&v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(r),
            })
        };
        let MessageResponse::FileDescriptorResponse(f) = ask(MessageRequest::FileContainingSymbol(
            "envoy.service.secret.v3.SecretDiscoveryService.StreamSecrets".into(),
        )) else {
            panic!("no file for StreamSecrets");
        };
        let first = FileDescriptorProto::decode(f.file_descriptor_proto[0].as_slice()).unwrap();
        assert_eq!(first.name(), "envoy/service/secret/v3/sds.proto");
        // Its imports follow (discovery.proto, base.proto, any.proto, status.proto...).
        assert!(f.file_descriptor_proto.len() >= 4);
        assert!(matches!(
            ask(MessageRequest::FileContainingSymbol(
                "X509SVIDResponse".into()
            )),
            MessageResponse::FileDescriptorResponse(_)
        ));
        assert!(matches!(
            ask(MessageRequest::FileContainingSymbol(
                "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig.TrustDomain"
                    .into()
            )),
            MessageResponse::FileDescriptorResponse(_)
        ));
        assert!(matches!(
            ask(MessageRequest::FileByFilename("nope.proto".into())),
            MessageResponse::ErrorResponse(_)
        ));
    }
}
