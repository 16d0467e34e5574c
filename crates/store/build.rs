// `sqlx::migrate!` embeds the migrations at compile time, and cargo does not see a new file in
// the folder on its own: rebuild whenever the migrations change (sqlx's documented recipe).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
