"""Named defaults, each with a one-line why. Settings and schemas refer to these names."""

from __future__ import annotations

# Storage ------------------------------------------------------------------------------------
DATA_ROOT = "./hpo-data"  # one folder per installation: database, uploads, artifacts
DATABASE_FILE = "hpo.db"  # SQLite file under DATA_ROOT, shared by API, workers and dashboard
SQLITE_BUSY_TIMEOUT_S = 30.0  # writers wait this long for the WAL lock instead of failing
HEARTBEAT_INTERVAL_S = 5  # a live worker touches its running trial this often
HEARTBEAT_GRACE_S = 20  # 4 missed beats before a trial counts as stale and is retried
MAX_TRIAL_RETRIES = 3  # a crashed trial is retried this often with the same parameters
MAX_TRIAL_FAILURES = 3  # a job whose own trials fail this many times is failed (not a crash)

# Training -----------------------------------------------------------------------------------
MAX_EPOCHS = 20  # enough for MLPs on digits/MNIST to plateau with early stopping
BATCH_SIZE = 128  # a standard minibatch that keeps small MLPs efficient on CPU
VALIDATION_SPLIT = 0.2  # the lectures' validation split
TEST_SPLIT = 0.1  # held out, touched only for the best trial
PATIENCE = 3  # epochs without improvement before per-trial early stopping
SPLIT_SEED = 0  # the job's split is seeded so every trial sees the same validation set

# Worker -------------------------------------------------------------------------------------
# Idle workers look for runnable jobs this often: a new job waits half of it on average before
# its first trial (one indexed SELECT per idle worker each time).
POLL_INTERVAL_S = 0.25
STOP_GRACE_S = 10.0  # docker compose's default stop grace; SIGTERM finishes within it
STOP_MARGIN_S = 3.0  # of that grace, kept for failing and re-queueing the interrupted trial
KEEP_ALIVE_S = 75  # idle HTTP connections: above clients' expiry (httpx 5 s) and LBs' 60 s
EPOCH_REPORT_INTERVAL_S = 2.0  # a population writes its members' epoch values this often
STORAGE_RETRY_S = 60.0  # a database restart takes seconds; a trial waits this long, then gives up

# Limits (each configurable through HPO_ settings) --------------------------------------------
MAX_N_TRIALS = 10_000  # keeps one job from monopolising the workers for days
MAX_EPOCHS_LIMIT = 1_000  # an epoch budget beyond this is almost surely a typo
MAX_HIDDEN_WIDTH = 8_192  # per layer; larger needs a GPU and a reason
MAX_HIDDEN_LAYERS = 32  # deeper MLPs are outside what this service is for
MAX_PARAMETERS = 50_000_000  # ~200 MB of fp32 weights per model
MAX_GRID_SIZE = 10_000  # grid points are enqueued up front; bound the rows written
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # an upload larger than this gets 413
MAX_DATASET_ROWS = 2_000_000  # rows in a CSV/NPZ dataset
MAX_DATASET_FEATURES = 100_000  # columns in a CSV/NPZ dataset
MAX_ACTIVE_JOBS_PER_OWNER = 20  # queued+running jobs per owner before 429
MAX_REQUEST_BYTES = 1024 * 1024  # a JSON body (a job spec) is a few KB; bounds memory per request
UPLOAD_ENVELOPE_BYTES = 64 * 1024  # multipart boundaries and part headers around an upload
