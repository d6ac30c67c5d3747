//! Connecting to the databases, and saying why a connection failed in terms
//! an operator can act on (wrong password, missing database, server down).
//!
//! Passwords come from the URL or from a configured [`Secret`]; neither ever
//! appears in an error: errors name the endpoint as `host:port/database`.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::config::{DatabaseUrl, Secret};
use crate::ErrorClass;

/// How long to wait for a server to accept a connection. A healthy database
/// on the same network answers in milliseconds; past 10 s something is wrong
/// and `check` should say so rather than hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Shown to the server as `application_name`, so DBAs can tell our sessions
/// apart in `pg_stat_activity` and `pg_stat_replication`.
pub const APPLICATION_NAME: &str = "loyalty-cdc";

/// A connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("authentication failed for user `{user}` at {endpoint}: {detail}")]
    AuthenticationFailed {
        endpoint: String,
        user: String,
        detail: String,
    },
    #[error("database `{database}` does not exist at {endpoint}")]
    UnknownDatabase { endpoint: String, database: String },
    #[error("user `{user}` may not connect to {endpoint}: {detail}")]
    NotPermitted {
        endpoint: String,
        user: String,
        detail: String,
    },
    #[error("connecting to {endpoint} failed: {detail}")]
    Other { endpoint: String, detail: String },
}

impl ConnectError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unreachable { .. } | Self::Other { .. } => ErrorClass::Transient,
            Self::AuthenticationFailed { .. }
            | Self::UnknownDatabase { .. }
            | Self::NotPermitted { .. } => ErrorClass::Config,
        }
    }

    /// What the operator should do about it.
    pub fn fix(&self) -> String {
        match self {
            Self::Unreachable { .. } => "start the server, or correct host and port in the URL (locally: bash docker/setup-local-databases.sh starts both databases)".into(),
            Self::AuthenticationFailed { .. } => "correct the password: in the URL, or in the `password` key as { env = \"VAR\" } / { file = \"path\" }".into(),
            Self::UnknownDatabase { database, .. } => format!("create database `{database}` or correct the database name in the URL"),
            Self::NotPermitted { .. } => "grant the user access to this database (PostgreSQL: a pg_hba.conf line and CONNECT; MySQL: GRANT SELECT ON db.* TO user)".into(),
            Self::Other { .. } => "see the server's log for the cause".into(),
        }
    }
}

fn endpoint(url: &DatabaseUrl, default_port: u16) -> String {
    let url = url.expose();
    format!(
        "{}:{}/{}",
        url.host_str().unwrap_or("?"),
        url.port().unwrap_or(default_port),
        url.path().trim_start_matches('/')
    )
}

/// PostgreSQL connection settings from a URL and an optional password secret.
pub fn postgres_config(
    url: &DatabaseUrl,
    password: Option<&Secret>,
) -> Result<tokio_postgres::Config, ConnectError> {
    let mut config: tokio_postgres::Config =
        url.expose()
            .as_str()
            .parse()
            .map_err(|error: tokio_postgres::Error| ConnectError::Other {
                endpoint: endpoint(url, 5432),
                detail: format!("the URL is not a valid PostgreSQL connection string: {error}"),
            })?;
    if let Some(password) = password.and_then(Secret::expose) {
        config.password(password);
    }
    config
        .application_name(APPLICATION_NAME)
        .connect_timeout(CONNECT_TIMEOUT);
    Ok(config)
}

/// Opens one PostgreSQL connection; its driver task runs on the runtime
/// until the client is dropped.
pub async fn postgres(
    url: &DatabaseUrl,
    password: Option<&Secret>,
) -> Result<tokio_postgres::Client, ConnectError> {
    let config = postgres_config(url, password)?;
    let connecting = config.connect(NoTls);
    let (client, connection) = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => return Err(describe_postgres_error(url, &error)),
        Err(_) => {
            return Err(ConnectError::Unreachable {
                endpoint: endpoint(url, 5432),
                detail: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            })
        }
    };
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

fn describe_postgres_error(url: &DatabaseUrl, error: &tokio_postgres::Error) -> ConnectError {
    let endpoint = endpoint(url, 5432);
    let user = url.username().to_string();
    let detail = error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| error.to_string());
    match error.code() {
        Some(code) if *code == SqlState::INVALID_PASSWORD => ConnectError::AuthenticationFailed {
            endpoint,
            user,
            detail,
        },
        Some(code) if *code == SqlState::INVALID_CATALOG_NAME => ConnectError::UnknownDatabase {
            endpoint,
            database: url.database().unwrap_or_default().to_string(),
        },
        Some(code)
            if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *code == SqlState::INSUFFICIENT_PRIVILEGE =>
        {
            ConnectError::NotPermitted {
                endpoint,
                user,
                detail,
            }
        }
        Some(_) => ConnectError::Other { endpoint, detail },
        // No SQLSTATE: the failure is below the protocol (refused, reset,
        // DNS, TLS), which is worth retrying.
        None => ConnectError::Unreachable {
            endpoint,
            detail: io_detail(error),
        },
    }
}

/// The innermost cause, e.g. "Connection refused (os error 111)".
fn io_detail(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    innermost.to_string()
}

/// MySQL/MariaDB connection options from a URL and an optional password.
pub fn mysql_opts(
    url: &DatabaseUrl,
    password: Option<&Secret>,
) -> Result<mysql_async::Opts, ConnectError> {
    let mut raw = url.expose().clone();
    // mysql_async accepts only `mysql://`; `mariadb://` is the same protocol.
    if raw.scheme() == "mariadb" {
        let _ = raw.set_scheme("mysql");
    }
    let opts = mysql_async::Opts::from_url(raw.as_str()).map_err(|error| ConnectError::Other {
        endpoint: endpoint(url, 3306),
        detail: format!("the URL is not a valid MySQL connection URL: {error}"),
    })?;
    let mut builder = mysql_async::OptsBuilder::from_opts(opts);
    if let Some(password) = password.and_then(Secret::expose) {
        builder = builder.pass(Some(password));
    }
    Ok(builder.into())
}

/// Opens one MySQL/MariaDB connection.
pub async fn mysql(
    url: &DatabaseUrl,
    password: Option<&Secret>,
) -> Result<mysql_async::Conn, ConnectError> {
    let opts = mysql_opts(url, password)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, mysql_async::Conn::new(opts)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(error)) => Err(describe_mysql_error(url, error)),
        Err(_) => Err(ConnectError::Unreachable {
            endpoint: endpoint(url, 3306),
            detail: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// MySQL/MariaDB server error codes met while connecting.
mod mysql_codes {
    /// ER_DBACCESS_DENIED_ERROR
    pub const DB_ACCESS_DENIED: u16 = 1044;
    /// ER_ACCESS_DENIED_ERROR (wrong user or password)
    pub const ACCESS_DENIED: u16 = 1045;
    /// ER_BAD_DB_ERROR
    pub const UNKNOWN_DATABASE: u16 = 1049;
    /// ER_HOST_NOT_PRIVILEGED
    pub const HOST_NOT_PRIVILEGED: u16 = 1130;
}

fn describe_mysql_error(url: &DatabaseUrl, error: mysql_async::Error) -> ConnectError {
    let endpoint = endpoint(url, 3306);
    let user = url.username().to_string();
    match error {
        mysql_async::Error::Server(server) => match server.code {
            mysql_codes::ACCESS_DENIED => ConnectError::AuthenticationFailed {
                endpoint,
                user,
                detail: server.message,
            },
            mysql_codes::UNKNOWN_DATABASE => ConnectError::UnknownDatabase {
                endpoint,
                database: url.database().unwrap_or_default().to_string(),
            },
            mysql_codes::DB_ACCESS_DENIED | mysql_codes::HOST_NOT_PRIVILEGED => {
                ConnectError::NotPermitted {
                    endpoint,
                    user,
                    detail: server.message,
                }
            }
            code => ConnectError::Other {
                endpoint,
                detail: format!("server error {code}: {}", server.message),
            },
        },
        mysql_async::Error::Io(io) => ConnectError::Unreachable {
            endpoint,
            detail: io_detail(&io),
        },
        other => ConnectError::Other {
            endpoint,
            detail: other.to_string(),
        },
    }
}
