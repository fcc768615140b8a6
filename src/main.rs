fn main() {
    std::process::exit(diskvault::cli::main());
}
