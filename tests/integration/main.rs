mod engine;
mod engine_config;
