//! The container engine, through bollard on a Docker-compatible Unix socket (Docker Engine, or
//! Podman's compatible service). Only what the reconcile loop needs, on Outpost's own labelled
//! containers.

use std::collections::HashMap;
use std::path::Path;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StartContainerOptions,
};
use futures_util::{Stream, StreamExt};
use outpost_config::AppConfig;

use super::{LABEL_APP, LABEL_MANAGED, LABEL_SPEC};

/// Seconds before a request to the engine times out.
const REQUEST_TIMEOUT: u64 = 30;

/// A failure talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine is unreachable or answered nonsense: mark apps INACTIVE, reconnect later.
    #[error("container engine at {socket}: {source}")]
    Unreachable {
        socket: String,
        source: bollard::errors::Error,
    },
    /// One operation on one app failed: report it on the app, retry with backoff.
    #[error("{what} for app \"{app}\": {source}")]
    Operation {
        app: String,
        what: &'static str,
        source: bollard::errors::Error,
    },
    /// The image is not present and pulling is off: report it on the app.
    #[error("image \"{0}\" is not present locally and apps.pull = false")]
    ImageMissing(String),
}

/// What the loop sees of one managed container.
#[derive(Debug, Clone)]
pub struct Observed {
    pub id: String,
    pub app: String,
    pub spec: String,
    pub running: bool,
    pub exit_code: Option<i64>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub health: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    socket: String,
}

impl Engine {
    /// Connects and negotiates the API version (the lower of ours and the engine's).
    pub async fn connect(socket: &Path) -> Result<Engine, EngineError> {
        let name = socket.display().to_string();
        let unreachable = |source| EngineError::Unreachable {
            socket: name.clone(),
            source,
        };
        let docker =
            Docker::connect_with_unix(&name, REQUEST_TIMEOUT, bollard::API_DEFAULT_VERSION)
                .map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        docker.ping().await.map_err(unreachable)?;
        Ok(Engine {
            docker,
            socket: name,
        })
    }

    fn unreachable(&self, source: bollard::errors::Error) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Every container labelled as Outpost's, running or not.
    pub async fn managed(&self) -> Result<Vec<Observed>, EngineError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_MANAGED}=true")])]);
        let summaries = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..ListContainersOptions::default()
            }))
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut out = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            let labels = summary.labels.unwrap_or_default();
            // The filter asked for it; check again so a wrong filter can never reach others.
            if labels.get(LABEL_MANAGED).map(String::as_str) != Some("true") {
                continue;
            }
            let Some(app) = labels.get(LABEL_APP).cloned() else {
                continue;
            };
            let inspected = match self
                .docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
            {
                Ok(i) => i,
                // Removed between the list and the inspect.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => continue,
                Err(e) => return Err(self.unreachable(e)),
            };
            let state = inspected.state.unwrap_or_default();
            let running = matches!(
                state.status,
                Some(
                    bollard::models::ContainerStateStatusEnum::RUNNING
                        | bollard::models::ContainerStateStatusEnum::RESTARTING
                )
            );
            out.push(Observed {
                id,
                app,
                spec: labels.get(LABEL_SPEC).cloned().unwrap_or_default(),
                running,
                exit_code: state.exit_code,
                started_at: state.started_at,
                finished_at: state.finished_at,
                health: state
                    .health
                    .and_then(|h| h.status)
                    .map(|s| s.to_string())
                    .filter(|s| !s.is_empty() && s != "none"),
            });
        }
        Ok(out)
    }

    /// Makes sure the image is present: inspects it, pulls it if allowed.
    pub async fn ensure_image(&self, app: &AppConfig, pull: bool) -> Result<(), EngineError> {
        match self.docker.inspect_image(&app.image).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(self.unreachable(e)),
        }
        if !pull {
            return Err(EngineError::ImageMissing(app.image.clone()));
        }
        tracing::info!(app = %app.name, image = %app.image, "Pulling image");
        let mut progress = self.docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(app.image.clone()),
                ..CreateImageOptions::default()
            }),
            None,
            None,
        );
        while let Some(step) = progress.next().await {
            step.map_err(|source| EngineError::Operation {
                app: app.name.clone(),
                what: "pulling the image",
                source,
            })?;
        }
        Ok(())
    }

    /// Creates and starts the app's container; returns its id.
    pub async fn create_and_start(
        &self,
        app: &AppConfig,
        spec_digest: &str,
        extra_env: Vec<String>,
    ) -> Result<String, EngineError> {
        let op = |what| {
            let name = app.name.clone();
            move |source| EngineError::Operation {
                app: name,
                what,
                source,
            }
        };
        let body = container_body(app, spec_digest, extra_env);
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(container_name(&app.name)),
                    ..CreateContainerOptions::default()
                }),
                body,
            )
            .await
            .map_err(op("creating the container"))?;
        self.start(&app.name, &created.id).await?;
        Ok(created.id)
    }

    pub async fn start(&self, app: &str, id: &str) -> Result<(), EngineError> {
        self.docker
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(|source| EngineError::Operation {
                app: app.to_owned(),
                what: "starting the container",
                source,
            })
    }

    /// Removes a managed container (stopping it first). Gone already counts as done.
    pub async fn remove(&self, app: &str, id: &str) -> Result<(), EngineError> {
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..RemoveContainerOptions::default()
                }),
            )
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(source) => Err(EngineError::Operation {
                app: app.to_owned(),
                what: "removing the container",
                source,
            }),
        }
    }

    /// The container's output (stdout and stderr interleaved), the last `tail` lines, then
    /// more as it comes if `follow`.
    pub fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> impl Stream<Item = Result<bytes_like::Bytes, bollard::errors::Error>> + use<> {
        self.docker
            .logs(
                id,
                Some(LogsOptions {
                    follow,
                    stdout: true,
                    stderr: true,
                    tail: tail.map_or_else(|| "all".to_owned(), |n| n.to_string()),
                    ..LogsOptions::default()
                }),
            )
            .map(|item| item.map(|out| out.into_bytes()))
    }
}

/// Re-exported so callers need not depend on `bytes` themselves.
pub mod bytes_like {
    pub use axum::body::Bytes;
}

/// The engine-side name of an app's container.
pub fn container_name(app: &str) -> String {
    format!("outpost-app-{app}")
}

/// The container definition: image, command, env, labels, limits, mounts, ports. The engine's
/// own restart policy stays "no": the reconcile loop restarts.
pub fn container_body(
    app: &AppConfig,
    spec_digest: &str,
    extra_env: Vec<String>,
) -> ContainerCreateBody {
    let mut env = app.env.clone();
    env.extend(extra_env);
    let labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_APP.to_owned(), app.name.clone()),
        (LABEL_SPEC.to_owned(), spec_digest.to_owned()),
    ]);
    let mut binds = Vec::new();
    for mount in &app.mounts {
        if let Ok(m) = AppConfig::parse_mount(mount) {
            let mode = if m.read_only { "ro" } else { "rw" };
            binds.push(format!("{}:{}:{mode}", m.source, m.target));
        }
    }
    let mut exposed = HashMap::new();
    let mut bindings = HashMap::new();
    for port in &app.ports {
        if let Ok(p) = AppConfig::parse_port(port) {
            let key = format!("{}/{}", p.container, if p.udp { "udp" } else { "tcp" });
            exposed.insert(key.clone(), HashMap::new());
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: None,
                    host_port: Some(p.host.to_string()),
                }]),
            );
        }
    }
    ContainerCreateBody {
        image: Some(app.image.clone()),
        cmd: (!app.command.is_empty()).then(|| app.command.clone()),
        env: Some(env),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(HostConfig {
            binds: (!binds.is_empty()).then_some(binds),
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            memory: app
                .memory
                .map(|m| i64::try_from(m.bytes()).unwrap_or(i64::MAX)),
            nano_cpus: app.cpus.map(|c| (c * 1e9).round() as i64),
            // OUTPOST_MQTT_URL names the host through this alias (Docker 20.10+, Podman).
            extra_hosts: Some(vec!["host.docker.internal:host-gateway".to_owned()]),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}
