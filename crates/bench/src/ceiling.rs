//! Scenario E's endpoint: a bare axum handler in the bench process that reads the body and
//! answers `202`, nothing else. The load generator against it measures what HTTP on loopback
//! costs on this machine, the ceiling of scenario A.

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use tokio::sync::oneshot;

pub struct Ceiling {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn accept(_body: Bytes) -> StatusCode {
    StatusCode::ACCEPTED
}

impl Ceiling {
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/events", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let app = Router::new().route("/v1/events", post(accept));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            url,
            stop: Some(stop),
            task,
        })
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
