//! Drives a restore job through the job state machine in tests: the job, its source, its
//! credentials and a virtual clock that jumps to each step's time. Each provider's tests wrap it
//! with their own canned answers.

use crate::config::SourceConfig;
use crate::http::HttpRequest;
use crate::identity::{JobId, Task, Trigger};
use crate::job::{Action, Context, Event, Job};
use crate::providers::Credentials;
use crate::restore::{plan, Io};
use crate::secret::Secret;
use crate::time::Timestamp;
use serde_json::Value;

/// Declares `struct $name(Driver)` that derefs to the driver, for a provider's own helpers.
macro_rules! driven {
    ($name:ident) => {
        struct $name(super::driver::Driver);

        impl std::ops::Deref for $name {
            type Target = super::driver::Driver;
            fn deref(&self) -> &super::driver::Driver {
                &self.0
            }
        }

        impl std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut super::driver::Driver {
                &mut self.0
            }
        }
    };
}
pub(super) use driven;

/// The job under test and what it runs with.
pub(super) struct Driver {
    pub job: Job,
    pub src: SourceConfig,
    pub creds: Credentials,
    pub now: Timestamp,
}

impl Driver {
    /// Plans `task` on `src` (an `Err` is the 400 the request would get) and makes its job,
    /// job id `0123456789abcdef`, started at `now` by the API, with `secrets` set.
    pub fn start(
        task: Task,
        src: SourceConfig,
        params: &Value,
        backup: Option<String>,
        secrets: &[(&str, &str)],
        now: Timestamp,
    ) -> Result<Self, String> {
        let state = plan(task, &src, params, backup)?;
        let job = Job::new(JobId::new("0123456789abcdef"), &src, Trigger::Api, None, None, now).restore_of(task, state);
        let mut creds = Credentials::new();
        for (name, value) in secrets {
            creds.insert(*name, Secret::new(*value));
        }
        Ok(Self { job, src, creds, now })
    }

    /// Hands the job one event at the current time.
    pub fn feed(&mut self, event: Event) -> Action {
        let cx = Context { now: self.now, jitter: 0.0, source: &self.src, creds: &self.creds, seen: &[] };
        let (job, action) = self.job.clone().handle(event, &cx);
        self.job = job;
        action
    }

    /// Moves the clock to the job's next step (if later) and wakes it.
    pub fn wake(&mut self) -> Action {
        if let Some(at) = self.job.next_step_at {
            self.now = self.now.max(at);
        }
        self.feed(Event::Wake)
    }

    /// Wakes and expects a request; returns it.
    pub fn request(&mut self) -> HttpRequest {
        match self.wake() {
            Action::Send(req) => req,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    /// Wakes and expects R2 work; returns it.
    pub fn io(&mut self) -> Io {
        match self.wake() {
            Action::Restore(io) => *io,
            other => panic!("expected R2 work, got {other:?}"),
        }
    }
}
