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

/// The route of `method path`, or why it is not served.
pub fn route(method: &Method, path: &str, alt: Option<&str>) -> Result<Route, String> {
    let not_served = || {
        format!(
            "keylease's proxy does not serve {method} {path}: it serves models/{{model}}:generateContent, :streamGenerateContent, :embedContent, :batchEmbedContents, :countTokens, models, models/{{model}}, openai/chat/completions and openai/embeddings (v1beta and v1). The Files API is not served: an uploaded file belongs to the project of the key that uploaded it, and the next call may run on another project's key; upload with a key of your own and send the file inline, or call Gemini directly."
        )
    };
    let rest = path.strip_prefix('/').unwrap_or(path);
    let (version, rest) = rest.split_once('/').ok_or_else(not_served)?;
    let version = match version {
        "v1beta" => "v1beta",
        "v1" => "v1",
        _ => return Err(not_served()),
    };
    let post = *method == Method::POST;
    let get = *method == Method::GET;
    let (call, model) = match rest {
        "models" if get => (Call::ListModels, None),
        "openai/chat/completions" if post && version == "v1beta" => (Call::OpenAiChat, None),
        "openai/embeddings" if post && version == "v1beta" => (Call::OpenAiEmbeddings, None),
        _ => {
            let name = rest.strip_prefix("models/").ok_or_else(not_served)?;
            match name.split_once(':') {
                None if get && valid_model(name) => (Call::GetModel, Some(name)),
                Some((model, method_name)) if post && valid_model(model) => {
                    let call = match method_name {
                        "generateContent" => Call::Generate,
                        "streamGenerateContent" => Call::Stream {
                            sse: alt == Some("sse"),
                        },
                        "embedContent" => Call::Embed,
                        "batchEmbedContents" => Call::BatchEmbed,
                        "countTokens" => Call::CountTokens,
                        _ => return Err(not_served()),
                    };
                    (call, Some(model))
                }
                _ => return Err(not_served()),
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

    fn post(path: &str) -> Result<Route, String> {
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
    fn everything_else_is_refused_naming_the_path() {
        for (method, path) in [
            (Method::POST, "/upload/v1beta/files"),
            (Method::GET, "/v1beta/files"),
            (Method::POST, "/v1beta/models/m:predict"),
            (Method::GET, "/v1beta/models/m:generateContent"),
            (Method::POST, "/v2/models/m:generateContent"),
            (Method::POST, "/v1beta/models/../x:generateContent"),
            (Method::POST, "/v1/openai/chat/completions"),
            (Method::DELETE, "/v1beta/models"),
            (Method::GET, "/"),
        ] {
            let refused = route(&method, path, None).unwrap_err();
            assert!(refused.contains(path), "{refused}");
        }
    }
}
