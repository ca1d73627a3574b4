//! Being written.
mod common;

fn main() {
    if !common::invoked_as_bench() {}
}
