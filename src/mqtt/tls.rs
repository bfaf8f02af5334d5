//! TLS towards the broker: rustls with TLS 1.2+, the system roots or a configured CA,
//! an optional client certificate, and the explicit opt-out that verifies nothing.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::MqttSetupError;
use crate::config::TlsConfig;

/// rustls client config: TLS 1.2+, system roots or the configured CA, optional client
/// certificate, or (explicit opt-out) no verification at all.
pub fn tls_config(tls: &TlsConfig) -> Result<ClientConfig, MqttSetupError> {
    let err = |what: &str, e: &dyn std::fmt::Display| MqttSetupError::Tls(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("protocol versions", &e))?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| err(&format!("ca_file {}", path.display()), &e))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(MqttSetupError::Tls(format!(
                        "ca_file {}: no usable CA certificate",
                        path.display()
                    )));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(MqttSetupError::Tls(
                        "no system trust roots found; set mqtt.tls.ca_file".into(),
                    ));
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| err(&format!("client_cert_file {}", cert.display()), &e))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| err(&format!("client_key_file {}", key.display()), &e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| err("client certificate", &e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// Accepts any broker certificate (`insecure_skip_verify`); signatures are still
/// checked so the handshake itself stays sound.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
