//! [`ContentError`]: every way a content operation fails, each mapped to the gRPC code
//! a client can act on, with a message that says what is wrong.

use myconet_store::StoreError;

/// Why a content operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The request itself is wrong (a bad MRI, path, metadata, provider, file type).
    #[error("{0}")]
    Invalid(String),
    /// The package or file is not in the store.
    #[error("{0}")]
    NotFound(String),
    /// The package is here but not complete, or the service cannot do this now.
    #[error("{0}")]
    Precondition(String),
    /// An export would overwrite a file.
    #[error("{0}")]
    Exists(String),
    /// No provider could deliver.
    #[error("{0}")]
    Unavailable(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something on this node failed (an I/O error outside the store, a task that died).
    #[error("{0}")]
    Internal(String),
}

impl ContentError {
    /// A bad request, from anything printable.
    pub fn invalid(e: impl std::fmt::Display) -> Self {
        Self::Invalid(e.to_string())
    }

    /// The gRPC status for this error.
    pub fn status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Self::Invalid(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Precondition(_) => Code::FailedPrecondition,
            Self::Exists(_) => Code::AlreadyExists,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
            Self::Store(e) => match e {
                StoreError::Quota { .. } => Code::ResourceExhausted,
                StoreError::UnknownPackage(_)
                | StoreError::UnknownFile { .. }
                | StoreError::UnknownBlob(_) => Code::NotFound,
                StoreError::Incomplete(_) | StoreError::NotVerified { .. } => {
                    Code::FailedPrecondition
                }
                StoreError::DataTooShort { .. }
                | StoreError::DataTooLong { .. }
                | StoreError::MissingData { .. }
                | StoreError::ManifestSizeMismatch { .. }
                | StoreError::ImpossibleFile { .. }
                | StoreError::Read(_) => Code::InvalidArgument,
                StoreError::Io { source, .. } | StoreError::Staging(source)
                    if source.raw_os_error() == Some(libc::ENOSPC) =>
                {
                    Code::ResourceExhausted
                }
                _ => Code::Internal,
            },
        };
        tonic::Status::new(code, self.to_string())
    }
}

impl From<ContentError> for tonic::Status {
    fn from(e: ContentError) -> Self {
        e.status()
    }
}

/// Shorthand for results of content operations.
pub type Result<T, E = ContentError> = std::result::Result<T, E>;
