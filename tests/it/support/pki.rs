//! A throwaway PKI generated at test time (nothing secret is checked in).

use std::path::PathBuf;

use keymeter::config::{GrpcTlsConfig, PeerAllowList};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The SPIFFE-style identities of the test client certificates.
pub const ENVOY_ID: &str = "spiffe://keymeter.test/ns/edge/sa/envoy";
pub const JOB_ID: &str = "spiffe://keymeter.test/ns/jobs/sa/nightly";
pub const INTRUDER_ID: &str = "spiffe://keymeter.test/ns/other/sa/intruder";

use super::process::TestDir;

/// PEM files in a temp dir:
/// - `ca_cert`: the test CA;
/// - `server_cert`/`server_key`: for `localhost` and `127.0.0.1`, signed by the CA;
/// - `other_ca_cert`: an unrelated CA, for "untrusted" tests;
/// - `client_cert`/`client_key`: a client certificate (CN `envoy`, URI SAN
///   [`ENVOY_ID`]) signed by the CA;
/// - `job_cert`/`job_key`, `intruder_cert`/`intruder_key`: client certificates from
///   the same CA for [`JOB_ID`] and [`INTRUDER_ID`];
/// - `wrong_name_cert`/`wrong_name_key`: a server certificate signed by the CA for
///   `broker.invalid` only, for "hostname mismatch" tests.
pub struct TestPki {
    pub job_cert: PathBuf,
    pub job_key: PathBuf,
    pub intruder_cert: PathBuf,
    pub intruder_key: PathBuf,
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub other_ca_cert: PathBuf,
    _dir: TestDir,
}

impl TestPki {
    /// keymeter's gRPC TLS with this PKI: the server certificate, client
    /// certificates required and verified against the CA, any identity allowed.
    pub fn grpc_tls(&self) -> GrpcTlsConfig {
        GrpcTlsConfig {
            cert_file: self.server_cert.clone(),
            key_file: self.server_key.clone(),
            client_ca_file: Some(self.ca_cert.clone()),
            allow: Default::default(),
        }
    }

    /// [`grpc_tls`](Self::grpc_tls) that lets only [`ENVOY_ID`] call Check and the
    /// access log, and only [`JOB_ID`] the Report API.
    pub fn grpc_tls_for_envoy_and_job(&self) -> GrpcTlsConfig {
        GrpcTlsConfig {
            allow: PeerAllowList {
                envoy: vec![ENVOY_ID.into()],
                report: vec![JOB_ID.into()],
            },
            ..self.grpc_tls()
        }
    }

    pub fn generate() -> TestPki {
        let dir = TestDir::new("pki");
        let write = |name: &str, pem: String| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };

        let (ca, ca_key) = new_ca("keymeter test CA");
        let (other_ca, _) = new_ca("keymeter unrelated CA");

        let server_cert = |names: Vec<String>| {
            let mut params = CertificateParams::new(names.clone()).expect("valid SANs");
            params
                .distinguished_name
                .push(DnType::CommonName, &names[0]);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let key = KeyPair::generate().expect("generate key");
            let cert = params
                .signed_by(&key, &ca, &ca_key)
                .expect("sign server cert");
            (cert, key)
        };
        let (server, server_key) = server_cert(vec!["localhost".into(), "127.0.0.1".into()]);
        let (wrong_name, wrong_name_key) = server_cert(vec!["broker.invalid".into()]);

        let client_cert = |name: &str, id: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs");
            params.distinguished_name.push(DnType::CommonName, name);
            params
                .subject_alt_names
                .push(SanType::URI(id.try_into().expect("a URI")));
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().expect("generate key");
            let cert = params
                .signed_by(&key, &ca, &ca_key)
                .expect("sign client cert");
            (cert, key)
        };
        let (client, client_key) = client_cert("envoy", ENVOY_ID);
        let (job, job_key) = client_cert("job", JOB_ID);
        let (intruder, intruder_key) = client_cert("intruder", INTRUDER_ID);

        TestPki {
            job_cert: write("job.pem", job.pem()),
            job_key: write("job.key", job_key.serialize_pem()),
            intruder_cert: write("intruder.pem", intruder.pem()),
            intruder_key: write("intruder.key", intruder_key.serialize_pem()),
            wrong_name_cert: write("wrong-name.pem", wrong_name.pem()),
            wrong_name_key: write("wrong-name.key", wrong_name_key.serialize_pem()),
            client_cert: write("client.pem", client.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            ca_cert: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            other_ca_cert: write("other-ca.pem", other_ca.pem()),
            _dir: dir,
        }
    }
}

fn new_ca(common_name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("generate key");
    let cert = params.self_signed(&key).expect("self-sign CA");
    (cert, key)
}
