mod engine;
mod engine_bench;
mod engine_config;
