//! wmvae: a streaming trainer for the vision model (V) of World Models
//! (Ha & Schmidhuber, 2018) on libtorch.
//!
//! Module map:
//!
//! * `model`      the convolutional VAE and its loss (tch only, no I/O)
//! * `adam`       our Adam, whose state saves with the weights
//! * `learner`    model + optimizer on one device: step, eval, encode, snapshot
//! * `weights`    named tensors to and from PyTorch-compatible safetensors
//! * `checkpoint` full checkpoints (weights + optimizer + metadata) as bytes
//! * `preprocess` CarRacing frames to 64x64 (crop, PIL-exact bilinear resize)
//! * `npy`        streaming uint8 frame arrays in numpy's format
//! * `encode`     the offline `wmvae encode` command
//! * `bench`      `wmvae bench train|encode|ingest` measurements
//! * `bench_daemon` `wmvae bench latency|pipeline`: the daemon measured from outside
//! * `wire`       the frame wire contract: MessagePack in, checked frames out
//! * `store`      the durable, bounded replay buffer (the only sled user)
//! * `bus`        streams, consumers, dead letters, publishing (the only NATS user)
//! * `ingest`     frames from the bus to the store, acked once durable
//! * `trainer`    the training loop (its own thread): guard, eval, checkpoints
//! * `sampler`    prefetched uniform batches from the buffer
//! * `latents`    a latent per stored frame, from the active checkpoint
//! * `control`    the `wmvae` micro service's endpoints (status, encode)
//! * `status`     what the daemon is doing, for the status endpoint
//! * `http`       /metrics, /healthz and the status page
//! * `serve`      the daemon's wiring and its shutdown signal
//! * `publish`    the `wmvae publish` command
//! * `synthetic`  CarRacing-like frames without a simulator
//! * `nats_server` a local nats-server child for benches and tests
//! * `export`     `wmvae buffer export` to .npz
//! * `operator`   the CLI's side of `checkpoint ...`: live through the daemon, else offline
//! * `ops`        checkpoint operations (list, show, rollback, import, ...) over the store
//! * `grid`       frames and reconstructions as a PNG grid
//! * `progress`   progress bars on a terminal, plain lines otherwise
//! * `config`     the one configuration: defaults, file, environment
//! * `device`     cpu / cuda / auto
//!
//! The binary (`src/main.rs`) only parses arguments and calls into these.

pub mod adam;
pub mod bench;
pub mod bench_daemon;
pub mod bus;
pub mod checkpoint;
pub mod config;
pub mod control;
pub mod device;
pub mod encode;
pub mod export;
pub mod grid;
pub mod http;
pub mod ingest;
pub mod latents;
pub mod learner;
pub mod model;
pub mod nats_server;
pub mod npy;
pub mod operator;
pub mod ops;
pub mod preprocess;
pub mod progress;
pub mod publish;
pub mod sampler;
pub mod serve;
pub mod status;
pub mod store;
pub mod synthetic;
pub mod trainer;
pub mod weights;
pub mod wire;
