//! A request's bill: its budget hold and its one usage row. The bill is
//! made when the request is planned and written exactly once: settled with
//! the answer's usage, or, when it is dropped unsettled (no route answered,
//! the request was refused, the caller left while it waited), as an error
//! that cost nothing. A settled bill's row is committed before the answer
//! completes: the caller waits on [`Settled::recorded`] before the last
//! bytes go out.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::ledger::{Outcome, Recorded, UsageRecord, UsageSource, now_ms};
use crate::money::Usd;
use crate::router::metering::{TokenUsage, usage_of};
use crate::router::policy::Candidate;
use crate::router::tokens::TokenCounter;
use crate::router::{Endpoint, Prices};
use crate::tenancy::{Principal, Reservation, Tenancy};

/// The usage a bill is settled with: reported (by the engine or the
/// provider), or counted from the text produced.
#[derive(Debug, Clone)]
pub enum Metered {
    Reported(TokenUsage),
    /// No report came: qpai counts the completion from the text produced.
    Produced(String),
}

impl Metered {
    /// A whole answer's usage report, else its text to count.
    pub fn of_answer(body: &Value) -> Metered {
        match usage_of(body) {
            Some(usage) => Metered::Reported(usage),
            None => Metered::Produced(answer_text(body)),
        }
    }
}

/// The billing of one batch line: tagged with its batch, priced at the
/// deployment's batch prices, and its row handed back (not sent to the
/// ledger's writer) so the batch runner writes it in the same transaction
/// as the line's result: a line is billed exactly when its result is kept.
#[derive(Debug, Clone)]
pub struct BatchBilling {
    pub batch_id: String,
    row: Arc<Mutex<Option<UsageRecord>>>,
}

impl BatchBilling {
    pub fn new(batch_id: &str) -> Self {
        Self {
            batch_id: batch_id.to_string(),
            row: Arc::default(),
        }
    }

    /// The line's usage row, once its bill is written.
    pub fn take_row(&self) -> Option<UsageRecord> {
        self.row.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The billing of one eval case: its row tagged with the run and written
/// to the ledger as usual, and a copy kept for the harness (the exact cost
/// of a streamed answer).
#[derive(Debug, Clone)]
pub struct EvalBilling {
    pub run_id: String,
    receipt: Arc<Mutex<Option<UsageRecord>>>,
}

impl EvalBilling {
    pub fn new(run_id: &str) -> Self {
        Self {
            run_id: run_id.to_string(),
            receipt: Arc::default(),
        }
    }

    /// The case's usage row, once its bill is written.
    pub fn receipt(&self) -> Option<UsageRecord> {
        self.receipt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What settling a bill gives: the cost, and the row's commit to wait on.
pub struct Settled {
    pub cost: Usd,
    pub recorded: Recorded,
}

/// A request's bill.
pub struct Bill {
    tenancy: Option<Arc<Tenancy>>,
    reservation: Option<Reservation>,
    record: UsageRecord,
    prices: Prices,
    /// Counts produced text when no usage comes.
    counter: Option<TokenCounter>,
    /// Set for a batch line: where its row goes.
    batch: Option<BatchBilling>,
    /// Set for an eval case: where a copy of its row goes.
    eval: Option<EvalBilling>,
    written: bool,
}

impl Drop for Bill {
    fn drop(&mut self) {
        if !self.written {
            // Nobody is left to wait for this row.
            let _ = self.write(Metered::Reported((0, 0)), Outcome::Error);
        }
    }
}

impl Bill {
    /// The request's id in the ledger.
    pub fn request_id(&self) -> &str {
        &self.record.request_id
    }

    /// Gives the request the id chosen for it beforehand.
    pub fn set_request_id(&mut self, id: &str) {
        self.record.request_id = id.to_string();
    }

    /// The bill of a request for `requested_model`, before any route.
    pub fn open(
        tenancy: Option<Arc<Tenancy>>,
        principal: &Principal,
        endpoint: Endpoint,
        requested_model: &str,
        stream: bool,
        batch: Option<BatchBilling>,
    ) -> Bill {
        Bill {
            tenancy,
            reservation: None,
            record: UsageRecord {
                request_id: format!("req_{}", uuid::Uuid::new_v4().simple()),
                ts_ms: now_ms(),
                tenant: principal.tenant.clone(),
                key_id: principal.key_id.clone(),
                endpoint,
                requested_model: requested_model.into(),
                deployment: String::new(),
                provider: None,
                model: String::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                cost: Usd::ZERO,
                outcome: Outcome::Error,
                attempts: 0,
                stream,
                usage_source: UsageSource::Counted,
                batch_id: batch.as_ref().map(|b| b.batch_id.clone()),
                prompt: None,
                eval_run: None,
                budget_hold: None,
            },
            prices: Prices::FREE,
            counter: None,
            batch,
            eval: None,
            written: false,
        }
    }

    /// The request now goes to `candidate`, with this budget hold; its
    /// prices and counter apply from here.
    pub fn route(
        &mut self,
        candidate: &Candidate,
        reservation: Option<Reservation>,
        counter: TokenCounter,
    ) {
        let deployment = &candidate.deployment;
        self.record.deployment = deployment.name.clone();
        self.record.provider = Some(deployment.provider);
        self.record.model = deployment.model.clone();
        self.record.prompt_tokens = candidate.prompt_tokens;
        self.prices = match self.batch {
            Some(_) => deployment.batch_prices,
            None => deployment.prices,
        };
        self.counter = Some(counter);
        self.reservation = reservation;
    }

    /// No route answered: the row names none (and holds no budget).
    pub fn unroute(&mut self) {
        self.record.deployment.clear();
        self.record.provider = None;
        self.record.model.clear();
        self.record.prompt_tokens = 0;
        self.prices = Prices::FREE;
        self.counter = None;
        self.reservation = None;
    }

    /// Tags the row with its eval run; a copy goes to the harness.
    pub fn tag_eval(&mut self, eval: Option<EvalBilling>) {
        self.record.eval_run = eval.as_ref().map(|e| e.run_id.clone());
        self.eval = eval;
    }

    /// The versioned prompt the request named.
    pub fn tag_prompt(&mut self, prompt: Option<String>) {
        self.record.prompt = prompt;
    }

    /// Tries made so far.
    pub fn tried(&mut self, attempts: u32) {
        self.record.attempts = attempts;
    }

    pub fn prices(&self) -> Prices {
        self.prices
    }

    /// Writes the request's one row with this usage and outcome, and
    /// settles its budget hold.
    pub fn settle(mut self, usage: Metered, outcome: Outcome) -> Settled {
        self.write(usage, outcome)
    }

    fn write(&mut self, usage: Metered, outcome: Outcome) -> Settled {
        let (prompt, completion, source) = match usage {
            Metered::Reported((p, c)) if outcome == Outcome::Error => (p, c, UsageSource::Counted),
            Metered::Reported((p, c)) => (p, c, UsageSource::Upstream),
            Metered::Produced(text) => (
                self.record.prompt_tokens,
                self.counter.as_ref().map_or(0, |c| c.count(&text)),
                UsageSource::Counted,
            ),
        };
        let cost = self.prices.cost(prompt, completion);
        self.written = true;
        self.record.prompt_tokens = prompt;
        self.record.completion_tokens = completion;
        self.record.cost = cost;
        self.record.outcome = outcome;
        self.record.usage_source = source;
        if let Some(reservation) = self.reservation.take() {
            self.record.budget_hold = reservation.settle(cost);
        }
        if let Some(eval) = &self.eval {
            *eval.receipt.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.record.clone());
        }
        let recorded = match (&self.batch, &self.tenancy) {
            (Some(batch), _) => {
                *batch.row.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.record.clone());
                Recorded::NONE
            }
            (None, Some(tenancy)) => tenancy.ledger.record(self.record.clone()),
            (None, None) => Recorded::NONE,
        };
        Settled { cost, recorded }
    }
}

/// The text a whole answer produced: every choice's content (or text) and
/// calls, to count when the answer reports no usage.
fn answer_text(value: &Value) -> String {
    let mut text = String::new();
    let choices = value.get("choices").and_then(Value::as_array);
    for choice in choices.into_iter().flatten() {
        let content = choice
            .pointer("/message/content")
            .or_else(|| choice.get("text"));
        if let Some(content) = content.and_then(Value::as_str) {
            text.push_str(content);
        }
        let calls = choice
            .pointer("/message/tool_calls")
            .and_then(Value::as_array);
        for call in calls.into_iter().flatten() {
            for part in ["/function/name", "/function/arguments"] {
                if let Some(piece) = call.pointer(part).and_then(Value::as_str) {
                    text.push_str(piece);
                }
            }
        }
    }
    text
}
