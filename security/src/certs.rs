//! Certificates for `flotilla tls ca create` and `flotilla tls cert create` (and tests): an
//! ECDSA P-256 CA, and leaf certificates carrying an [`Identity`] as their URI name plus the
//! DNS names and IPs a server is dialled at. Servers' and gateways' certificates may serve
//! TLS (serverAuth) and dial (clientAuth); everyone else's only dial. And [`self_signed`]:
//! an engine's own server certificate, trusted by its SHA-256 pin rather than by a CA.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, Role};

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> CertError {
    move |source| CertError::Rcgen { what, source }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// None: a certificate of the CA that names no identity (its holder is authenticated at
    /// the TLS layer but may call only public methods).
    pub identity: Option<Identity>,
    /// DNS names it is dialled at (servers, gateways).
    pub dns: Vec<String>,
    /// IP addresses it is dialled at.
    pub ips: Vec<IpAddr>,
    /// Validity from now (an hour back, for clock skew). Negative makes an expired
    /// certificate (tests).
    pub days: i64,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
    if days < 0 {
        params.not_before = params.not_after - Duration::days(1);
    }
}

/// Whether `name` is a DNS name a certificate may carry (`*.` first allowed).
pub fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A new CA named `name`, valid for `days`.
pub fn create_ca(name: &str, days: i64) -> Result<Issued, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "flotilla");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(rc("CA key"))?;
    let cert = params.self_signed(&key).map_err(rc("CA certificate"))?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A leaf certificate for `req`, signed by the CA in `ca`.
pub fn issue(ca: &Issued, req: &CertRequest) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(rc("the CA key"))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca.cert_pem).map_err(rc("the CA certificate"))?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rc("the CA certificate"))?;

    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("certificate parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.identity.as_ref().map_or_else(|| "anonymous".to_string(), |i| i.to_string()));
    dn.push(DnType::OrganizationName, "flotilla");
    params.distinguished_name = dn;
    if let Some(identity) = &req.identity {
        let uri = identity.uri().try_into().map_err(rc("the identity URI"))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    for d in &req.dns {
        if !valid_dns_name(d) {
            return Err(CertError::Invalid(format!("{d:?} is not a DNS name")));
        }
        let name = d.clone().try_into().map_err(|_| CertError::Invalid(format!("{d:?} is not a DNS name")))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.subject_alt_names.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if req.identity.as_ref().is_some_and(|i| matches!(i.role, Role::Peer | Role::Gateway)) {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, req.days);
    let key = KeyPair::generate().map_err(rc("key"))?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(rc("certificate"))?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A self-signed certificate and its key.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's DER encoding (what a pin is the SHA-256 of).
    pub cert_der: Vec<u8>,
}

/// A self-signed server certificate (ECDSA P-256, serverAuth) for `host`, an IP address or
/// a DNS name, valid for `days` from an hour ago. Its holder is trusted by the certificate's
/// SHA-256 (a pin), not by a CA: the agent makes one per engine (`--engine-tls`).
pub fn self_signed(host: &str, days: i64) -> Result<SelfSigned, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("certificate parameters"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
        Err(_) if valid_dns_name(host) && !host.starts_with("*.") => {
            let name = host.to_string().try_into().map_err(rc("the DNS name"))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        Err(_) => return Err(CertError::Invalid(format!("{host:?} is neither an IP address nor a DNS name"))),
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    dn.push(DnType::OrganizationName, "flotilla engine");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(rc("key"))?;
    let cert = params.self_signed(&key).map_err(rc("certificate"))?;
    Ok(SelfSigned { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = create_ca("test CA", 30).unwrap();
        let id = Identity::new(Role::Peer, "s1").unwrap();
        let req = CertRequest {
            identity: Some(id.clone()),
            dns: vec!["s1.local".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            days: 30,
        };
        let leaf = issue(&ca, &req).unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_cert_der(&ca_der), Err(crate::identity::IdentityError::Missing));
        let bad = CertRequest { dns: vec!["not a name!".into()], ..req };
        assert!(issue(&ca, &bad).is_err());
    }

    #[test]
    fn self_signed_certificates_name_their_host_and_match_their_pem() {
        let ip = self_signed("10.0.0.5", 30).unwrap();
        let der = CertificateDer::from_pem_slice(ip.cert_pem.as_bytes()).unwrap();
        assert_eq!(der.as_ref(), ip.cert_der.as_slice());
        let (_, cert) = x509_parser::parse_x509_certificate(&ip.cert_der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        assert_eq!(format!("{san:?}"), "[IPAddress([10, 0, 0, 5])]");
        assert_eq!(cert.issuer(), cert.subject(), "self-signed");
        assert!(self_signed("[::1]", 30).is_ok());
        let dns = self_signed("localhost", 30).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&dns.cert_der).unwrap();
        assert!(format!("{:?}", cert.subject_alternative_name()).contains("localhost"));
        assert_ne!(dns.cert_der, self_signed("localhost", 30).unwrap().cert_der, "a new key each time");
        for bad in ["", "not a name!", "*.x.example"] {
            assert!(self_signed(bad, 30).is_err(), "{bad:?}");
        }
    }
}
