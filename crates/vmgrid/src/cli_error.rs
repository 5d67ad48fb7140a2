//! Errors as the CLI reports them: a sentence for stderr and the exit code DESIGN.md fixes
//! (2 for bad input, 1 for everything else).

use std::fmt;

#[derive(Debug)]
pub enum CliError {
    /// The user's input is wrong: a job file, an image, an input file, an argument.
    BadInput(String),
    /// Anything else: a missing tool, an IO failure, an unreachable pool.
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::BadInput(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::BadInput(m) | CliError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<vmgrid_runtime::RunError> for CliError {
    fn from(e: vmgrid_runtime::RunError) -> Self {
        match e {
            vmgrid_runtime::RunError::BadJob(m) => CliError::BadInput(m),
            vmgrid_runtime::RunError::Host(m) | vmgrid_runtime::RunError::BadCheckpoint(m) => CliError::Failed(m),
        }
    }
}

impl From<vmgrid_job::JobFileError> for CliError {
    fn from(e: vmgrid_job::JobFileError) -> Self {
        CliError::BadInput(e.to_string())
    }
}
