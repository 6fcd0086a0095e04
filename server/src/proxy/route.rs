//! Which Gemini call a request is, from its method and path: the native `v1beta` and `v1`
//! methods and Gemini's OpenAI-compatible paths. Anything else is not served.

use axum::http::Method;

/// A call the proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Generate,
    /// `streamGenerateContent`: server-sent events with `alt=sse`, else a JSON array.
    Stream {
        sse: bool,
    },
    Embed,
    BatchEmbed,
    CountTokens,
    ListModels,
    GetModel,
    /// `openai/chat/completions`; streams when the body says `"stream": true`.
    OpenAiChat,
    OpenAiEmbeddings,
}

impl Call {
    /// Its name in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Stream { .. } => "stream",
            Self::Embed => "embed",
            Self::BatchEmbed => "batch_embed",
            Self::CountTokens => "count_tokens",
            Self::ListModels => "list_models",
            Self::GetModel => "get_model",
            Self::OpenAiChat => "openai_chat",
            Self::OpenAiEmbeddings => "openai_embeddings",
        }
    }

    /// The shape of the value of the query parameter `name` (decoded) it passes upstream, if
    /// it takes that parameter: no other text of the caller's goes. (The listing is fetched
    /// whole by the proxy itself, so it takes none.)
    pub fn query_parameter(&self, name: &str) -> Option<fn(&str) -> bool> {
        match (self, name) {
            (Self::Stream { .. }, "alt") => Some(|value| matches!(value, "sse" | "json")),
            _ => None,
        }
    }

    /// Whether the call spends one of the model's requests; `countTokens` and the model
    /// listing use a key without booking the quota.
    pub fn books_request(&self) -> bool {
        !matches!(self, Self::CountTokens | Self::ListModels | Self::GetModel)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `v1beta` or `v1`.
    pub version: &'static str,
    pub call: Call,
    /// From the path; OpenAI-compatible calls name theirs in the body.
    pub model: Option<String>,
}

/// Why a request has no route: the three answers differ for a client, as HTTP says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrouted {
    /// No Gemini endpoint has this path (404).
    #[error("{0}")]
    NotFound(String),
    /// The path is served, with another method (405); `allow` is the one it takes.
    #[error("{message}")]
    WrongMethod { message: String, allow: Method },
    /// A real Gemini endpoint keylease does not serve (501).
    #[error("{0}")]
    NotServed(String),
}

/// What the proxy serves, for messages.
const SERVED: &str = "models/{model}:generateContent, :streamGenerateContent, :embedContent, :batchEmbedContents, :countTokens, models, models/{model}, openai/chat/completions and openai/embeddings (v1beta and v1)";

/// Gemini's collections that keylease does not serve: each holds resources that belong to the
/// project of the key that made them, and the next call may run on another project's key.
const UNSERVED_COLLECTIONS: [&str; 7] = [
    "files",
    "cachedContents",
    "batches",
    "tunedModels",
    "corpora",
    "operations",
    "fileSearchStores",
];

/// Gemini's model methods that keylease does not serve.
const UNSERVED_MODEL_METHODS: [&str; 6] = [
    "batchGenerateContent",
    "asyncBatchEmbedContent",
    "predict",
    "predictLongRunning",
    "generateAnswer",
    "bidiGenerateContent",
];

/// The route of `method path`, or why there is none. Messages name the method and the path
/// (the caller's own text: the proxy masks secrets in whatever it answers).
pub fn route(method: &Method, path: &str, alt: Option<&str>) -> Result<Route, Unrouted> {
    let not_found = || {
        Unrouted::NotFound(format!(
            "{method} {path}: no such Gemini endpoint; keylease's proxy serves {SERVED}"
        ))
    };
    let not_served = || {
        Unrouted::NotServed(format!(
            "keylease's proxy does not serve {method} {path}: it serves {SERVED}. Files, cached contents and batches are not served: such a resource belongs to the project of the key that made it, and the next call may run on another project's key; make it with a key of your own and send the content inline, or call Gemini directly."
        ))
    };
    let wrong_method = |allow: Method| Unrouted::WrongMethod {
        message: format!("{method} {path}: this endpoint takes {allow}"),
        allow,
    };
    let rest = path.strip_prefix('/').unwrap_or(path);
    if rest.starts_with("upload/") {
        return Err(not_served());
    }
    let (version, rest) = rest.split_once('/').ok_or_else(not_found)?;
    let version = match version {
        "v1beta" => "v1beta",
        "v1" => "v1",
        _ => return Err(not_found()),
    };
    let collection = rest.split(['/', ':']).next().unwrap_or_default();
    if UNSERVED_COLLECTIONS.contains(&collection) {
        return Err(not_served());
    }
    let post = *method == Method::POST;
    let get = *method == Method::GET;
    let (call, model) = match rest {
        "models" if get => (Call::ListModels, None),
        "models" => return Err(wrong_method(Method::GET)),
        "openai/chat/completions" | "openai/embeddings" if version == "v1beta" && !post => {
            return Err(wrong_method(Method::POST));
        }
        "openai/chat/completions" if version == "v1beta" => (Call::OpenAiChat, None),
        "openai/embeddings" if version == "v1beta" => (Call::OpenAiEmbeddings, None),
        _ => {
            let name = rest.strip_prefix("models/").ok_or_else(not_found)?;
            match name.split_once(':') {
                None if valid_model(name) && get => (Call::GetModel, Some(name)),
                None if valid_model(name) => return Err(wrong_method(Method::GET)),
                Some((model, method_name)) if valid_model(model) => {
                    let call = match method_name {
                        "generateContent" => Call::Generate,
                        "streamGenerateContent" => Call::Stream {
                            sse: alt == Some("sse"),
                        },
                        "embedContent" => Call::Embed,
                        "batchEmbedContents" => Call::BatchEmbed,
                        "countTokens" => Call::CountTokens,
                        _ if UNSERVED_MODEL_METHODS.contains(&method_name) => {
                            return Err(not_served());
                        }
                        _ => return Err(not_found()),
                    };
                    if !post {
                        return Err(wrong_method(Method::POST));
                    }
                    (call, Some(model))
                }
                _ => return Err(not_found()),
            }
        }
    };
    Ok(Route {
        version,
        call,
        model: model.map(str::to_string),
    })
}

/// A model name as Gemini's are: letters, digits, `-`, `.`, `_`, at most 128 of them.
pub fn valid_model(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(path: &str) -> Result<Route, Unrouted> {
        route(&Method::POST, path, None)
    }

    #[test]
    fn native_and_openai_paths_are_recognised() {
        let generate = post("/v1beta/models/gemini-2.5-flash:generateContent").unwrap();
        assert_eq!(generate.call, Call::Generate);
        assert_eq!(generate.model.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(generate.version, "v1beta");
        assert_eq!(
            route(
                &Method::POST,
                "/v1/models/m:streamGenerateContent",
                Some("sse")
            )
            .unwrap()
            .call,
            Call::Stream { sse: true }
        );
        assert_eq!(
            post("/v1beta/models/m:streamGenerateContent").unwrap().call,
            Call::Stream { sse: false }
        );
        assert_eq!(
            post("/v1beta/models/m:countTokens").unwrap().call,
            Call::CountTokens
        );
        assert_eq!(
            post("/v1beta/models/text-embedding-004:batchEmbedContents")
                .unwrap()
                .call,
            Call::BatchEmbed
        );
        assert_eq!(
            route(&Method::GET, "/v1beta/models", None).unwrap().call,
            Call::ListModels
        );
        assert_eq!(
            route(&Method::GET, "/v1/models/gemini-2.5-pro", None)
                .unwrap()
                .call,
            Call::GetModel
        );
        assert_eq!(
            post("/v1beta/openai/chat/completions").unwrap().call,
            Call::OpenAiChat
        );
        assert!(!Call::CountTokens.books_request() && Call::Embed.books_request());
    }

    #[test]
    fn unknown_paths_wrong_methods_and_unserved_endpoints_are_told_apart() {
        let refused = |method: Method, path: &str| route(&method, path, None).unwrap_err();
        for (method, path) in [
            (Method::POST, "/v1beta/models/m:frobnicate"),
            (Method::POST, "/v2/models/m:generateContent"),
            (Method::POST, "/v1beta/models/../x:generateContent"),
            (Method::POST, "/v1/openai/chat/completions"),
            (Method::GET, "/"),
            (Method::GET, "/v1beta"),
            (Method::GET, "/v1beta/nothing"),
        ] {
            let refusal = refused(method, path);
            assert!(
                matches!(refusal, Unrouted::NotFound(_)),
                "{path}: {refusal:?}"
            );
            assert!(refusal.to_string().contains(path), "{refusal}");
        }
        for (method, path, allow) in [
            (
                Method::GET,
                "/v1beta/models/m:generateContent",
                Method::POST,
            ),
            (Method::PUT, "/v1beta/models/m:countTokens", Method::POST),
            (Method::DELETE, "/v1beta/models", Method::GET),
            (Method::POST, "/v1beta/models/gemini-2.5-pro", Method::GET),
            (Method::GET, "/v1beta/openai/chat/completions", Method::POST),
        ] {
            let refusal = refused(method, path);
            assert_eq!(
                refusal,
                Unrouted::WrongMethod {
                    message: refusal.to_string(),
                    allow
                },
                "{path}"
            );
        }
        for (method, path) in [
            (Method::POST, "/upload/v1beta/files"),
            (Method::GET, "/v1beta/files"),
            (Method::GET, "/v1beta/files/abc"),
            (Method::POST, "/v1beta/cachedContents"),
            (Method::GET, "/v1/batches/b1"),
            (Method::POST, "/v1beta/models/m:batchGenerateContent"),
            (Method::POST, "/v1beta/models/m:predict"),
        ] {
            let refusal = refused(method, path);
            assert!(
                matches!(refusal, Unrouted::NotServed(_)),
                "{path}: {refusal:?}"
            );
        }
    }
}
