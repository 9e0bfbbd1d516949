//! A throwaway certificate authority and a `localhost` certificate signed by it, written as PEM files
//! in a fresh directory: what a test needs to serve and trust `wss://` without touching the system.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct TestCa {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    /// Generates the CA and the server certificate (for `localhost`, 127.0.0.1 and ::1) under `base`.
    pub fn generate(base: &std::path::Path, name: &str) -> TestCa {
        let dir = base.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "switchboard test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let ca = TestCa { ca_file: dir.join("ca.pem"), cert_file: dir.join("cert.pem"), key_file: dir.join("key.pem") };
        std::fs::write(&ca.ca_file, ca_cert.pem()).unwrap();
        std::fs::write(&ca.cert_file, leaf.pem()).unwrap();
        std::fs::write(&ca.key_file, leaf_key.serialize_pem()).unwrap();
        ca
    }
}
