// Embedded migrations (`sqlx::migrate!`) are read at compile time; without this, a new
// migration file would not be picked up until some Rust file changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
