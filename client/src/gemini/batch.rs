//! Many prompts through [`LeasedGemini`] with a fixed number of concurrent jobs: the shape of
//! most batch workers, shared by the example worker and the fleet tests.

use super::{GenerateContentRequest, GenerateError, Generated, LeasedGemini};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Runs every prompt as its own task (`{task_prefix}-{index}`), at most `concurrency` at once;
/// the results come back in the prompts' order.
pub async fn run_batch(
    calls: &LeasedGemini,
    model: &str,
    prompts: Vec<String>,
    concurrency: usize,
    task_prefix: &str,
) -> Vec<Result<Generated, GenerateError>> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let jobs: Vec<_> = prompts
        .into_iter()
        .enumerate()
        .map(|(index, prompt)| {
            let calls = calls.clone();
            let model = model.to_string();
            let task = format!("{task_prefix}-{index}");
            let permits = permits.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.expect("never closed");
                calls
                    .generate(&task, &model, &GenerateContentRequest::text(prompt))
                    .await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        results.push(job.await.unwrap_or_else(|e| {
            Err(GenerateError::Provider {
                attempts: 0,
                last: format!("job panicked: {e}"),
                status: None,
            })
        }));
    }
    results
}
