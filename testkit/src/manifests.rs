//! Manifests the suites apply: a sim-engine `Model` with a replica count and GPUs per
//! replica.

/// A `Model` named `name` on the sim engine, `replicas` replicas of `gpus` GPUs each.
pub fn model_manifest(name: &str, replicas: u32, gpus: u32) -> String {
    format!("kind: Model\nmetadata:\n  name: {name}\nspec:\n  engine: sim\n  source: file:///models/{name}\n  replicas: {replicas}\n  gpus: {gpus}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_names_its_source_replicas_and_gpus() {
        let table: &[(&str, u32, u32, &str)] = &[
            ("chat", 3, 1, "kind: Model\nmetadata:\n  name: chat\nspec:\n  engine: sim\n  source: file:///models/chat\n  replicas: 3\n  gpus: 1\n"),
            ("big", 0, 8, "kind: Model\nmetadata:\n  name: big\nspec:\n  engine: sim\n  source: file:///models/big\n  replicas: 0\n  gpus: 8\n"),
        ];
        for (name, replicas, gpus, want) in table {
            assert_eq!(model_manifest(name, *replicas, *gpus), *want);
        }
    }
}
